"""Deterministic scenes for the demo: shapes of four classes on textured backgrounds.

Every scene is a function of ``(seed, domain)``: the same pair gives the same
pixels and the same boxes on every machine (only ``torch.Generator`` draws and
elementwise float arithmetic are used). A scene is planned first (every random
draw), then rendered, so the same plan can be rendered without its labelled
objects — which is how the tests check that every drawn object pixel lies in its
box.

Classes (label → name, label 0 is the background of torchvision detectors)::

    1 circle, 2 square, 3 triangle, 4 star

Domains:

- ``"val"`` (also the training distribution, with other seeds): 160×160 images,
  1–4 objects of 20–56 px in saturated colours, a soft beige texture with faint
  stripes, at most two thin lines of clutter, little sensor noise.
- ``"deploying"``: the same classes, shifted — smaller objects (14–44 px), more of
  them, three colours never seen in training besides the val ones, a blotchy green
  texture, more noise, and clutter the detector never saw (ellipses, rings).

Boxes are ``[x1, y1, x2, y2]`` in pixels, the tight box of the object's pixels
(pixel ``(x, y)`` covers ``[x, x + 1) × [y, y + 1)``), as torchvision detectors
take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Label → name; label 0 is the background class of torchvision detectors.
CLASS_NAMES: list[str] = ["__background__", "circle", "square", "triangle", "star"]
#: The domains :func:`make_scene` draws from.
DOMAINS: tuple[str, ...] = ("val", "deploying")

# Seeds of the training scenes start here: the val and deploying seeds the demo and
# the tests use (0, 1, 2, ...) are never trained on.
TRAIN_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class Domain:
    """The distribution of one domain's scenes (see the module docstring)."""

    size: tuple[int, int]
    n_objects: tuple[int, int]  # inclusive range
    radius: tuple[float, float]  # circumradius in pixels
    palette: tuple[tuple[float, float, float], ...]
    background: tuple[float, float, float]  # base colour of the texture
    texture_contrast: float
    texture_cells: int  # resolution of the smooth noise that is upsampled
    stripes: float  # amplitude of the stripes
    n_clutter: tuple[int, int]  # inclusive range
    clutter_kinds: tuple[str, ...]
    noise: float  # std of the per-pixel sensor noise


_VAL_PALETTE = (
    (0.90, 0.15, 0.15),
    (0.15, 0.75, 0.20),
    (0.15, 0.30, 0.90),
    (0.95, 0.85, 0.10),
    (0.85, 0.20, 0.85),
    (0.10, 0.80, 0.85),
    (0.95, 0.50, 0.05),
)

_DOMAINS: dict[str, Domain] = {
    "val": Domain(
        size=(160, 160),
        n_objects=(1, 4),
        radius=(10.0, 28.0),
        palette=_VAL_PALETTE,
        background=(0.62, 0.58, 0.50),
        texture_contrast=0.10,
        texture_cells=6,
        stripes=0.03,
        n_clutter=(0, 2),
        clutter_kinds=("line",),
        noise=0.02,
    ),
    "deploying": Domain(
        size=(160, 160),
        n_objects=(2, 6),
        radius=(7.0, 22.0),
        # the val colours and three the detector never saw (dark brown, pastel pink, dull blue)
        palette=(
            *_VAL_PALETTE,
            (0.30, 0.20, 0.10),
            (0.95, 0.75, 0.85),
            (0.35, 0.45, 0.80),
        ),
        background=(0.45, 0.55, 0.35),
        texture_contrast=0.18,
        texture_cells=14,
        stripes=0.0,
        n_clutter=(2, 5),
        clutter_kinds=("line", "ellipse", "ring"),
        noise=0.04,
    ),
}


def domain(name: str) -> Domain:
    """The :class:`Domain` called ``name`` (one of :data:`DOMAINS`)."""
    try:
        return _DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown scene domain {name!r}: choose one of {list(DOMAINS)}") from None


@dataclass(frozen=True)
class Shape:
    """One drawn primitive: a labelled object (``label`` ≥ 1) or clutter (``label`` 0)."""

    kind: str  # circle, square, triangle, star; clutter: line, ellipse, ring
    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    colour: tuple[float, float, float]
    aspect: float = 1.0  # ellipse: minor / major axis; line: width in pixels


@dataclass(frozen=True)
class ScenePlan:
    """Every random draw of one scene; :func:`render` turns it into pixels."""

    seed: int
    domain: str
    size: tuple[int, int]
    texture: Tensor  # [3, cells, cells] low-resolution noise
    stripe_phase: float
    stripe_angle: float
    noise: Tensor  # [3, H, W] standard normal, scaled by the domain's noise
    clutter: list[Shape] = field(default_factory=list)
    objects: list[Shape] = field(default_factory=list)


@dataclass(frozen=True)
class Scene:
    """A rendered scene: ``image`` float32 ``[3, H, W]`` in [0, 1] and its ground truth."""

    image: Tensor
    boxes: Tensor  # float32 [N, 4] xyxy, tight around each object's pixels
    labels: Tensor  # int64 [N]

    @property
    def target(self) -> dict[str, Tensor]:
        """The ground truth in torchvision's target format: ``{"boxes", "labels"}``."""
        return {"boxes": self.boxes, "labels": self.labels}


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _integer(g: torch.Generator, low: int, high: int) -> int:
    """Uniform in ``low..high`` inclusive."""
    return int(torch.randint(low, high + 1, (), generator=g))


def plan_scene(seed: int, domain_name: str = "val") -> ScenePlan:
    """Draws every random choice of the scene ``(seed, domain_name)``.

    Objects never overlap (their boxes, grown by 2 px, are disjoint) and lie
    inside the image; clutter is drawn beneath them.
    """
    spec = domain(domain_name)
    g = torch.Generator().manual_seed(int(seed) * 2 + DOMAINS.index(domain_name))
    h, w = spec.size
    texture = torch.rand(3, spec.texture_cells, spec.texture_cells, generator=g)
    stripe_phase = _uniform(g, 0.0, 2 * math.pi)
    stripe_angle = _uniform(g, 0.0, math.pi)
    noise = torch.randn(3, h, w, generator=g) * spec.noise
    clutter = []
    for _ in range(_integer(g, *spec.n_clutter)):
        kind = spec.clutter_kinds[_integer(g, 0, len(spec.clutter_kinds) - 1)]
        colour = spec.palette[_integer(g, 0, len(spec.palette) - 1)]
        aspect = _uniform(g, 1.0, 2.5) if kind == "line" else _uniform(g, 0.25, 0.5)
        clutter.append(
            Shape(
                kind,
                0,
                _uniform(g, 0, w),
                _uniform(g, 0, h),
                _uniform(g, 8.0, 40.0) if kind == "line" else _uniform(g, *spec.radius),
                _uniform(g, 0.0, math.pi),
                colour,
                aspect,
            )
        )
    objects: list[Shape] = []
    taken: list[tuple[float, float, float, float]] = []
    wanted = _integer(g, *spec.n_objects)
    for _ in range(wanted * 20):  # rejection sampling of free places
        if len(objects) == wanted:
            break
        label = _integer(g, 1, len(CLASS_NAMES) - 1)
        radius = _uniform(g, *spec.radius)
        cx = _uniform(g, radius + 1, w - radius - 1)
        cy = _uniform(g, radius + 1, h - radius - 1)
        angle = _uniform(g, 0.0, 2 * math.pi)
        colour = spec.palette[_integer(g, 0, len(spec.palette) - 1)]
        box = (cx - radius - 2, cy - radius - 2, cx + radius + 2, cy + radius + 2)
        if any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
            continue
        taken.append(box)
        objects.append(Shape(CLASS_NAMES[label], label, cx, cy, radius, angle, colour))
    return ScenePlan(
        int(seed),
        domain_name,
        (h, w),
        texture,
        stripe_phase,
        stripe_angle,
        noise,
        clutter,
        objects,
    )


def _grid(size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    h, w = size
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w) + 0.5
    return xs, ys


def _star_mask(u: Tensor, v: Tensor, points: int, outer: float, inner: float) -> Tensor:
    """Inside a star with ``points`` tips at radius ``outer`` and notches at ``inner``.

    A regular polygon is the star whose notches lie on its edges
    (``inner = outer * cos(pi / points)``). The boundary between a tip (angle 0)
    and the next notch (angle pi / points) is a straight segment; by symmetry,
    folding the polar angle into ``[0, pi / points]`` is enough.
    """
    sector = 2 * math.pi / points
    phi = torch.remainder(torch.atan2(v, u), sector)
    psi = torch.minimum(phi, sector - phi)
    p1x, p1y = outer, 0.0
    p2x, p2y = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    dx, dy = p2x - p1x, p2y - p1y
    # The ray at angle psi meets the segment at rho = (p1 x d) / (dir x d).
    limit = (p1x * dy - p1y * dx) / (torch.cos(psi) * dy - torch.sin(psi) * dx)
    return u * u + v * v <= limit * limit


def shape_mask(shape: Shape, size: tuple[int, int]) -> Tensor:
    """The pixels (bool ``[H, W]``) that ``shape`` covers in an image of ``size``."""
    xs, ys = _grid(size)
    x, y = xs - shape.cx, ys - shape.cy
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    u, v = x * cos + y * sin, -x * sin + y * cos
    r = shape.radius
    if shape.kind == "circle":
        return u * u + v * v <= r * r
    if shape.kind == "square":
        return _star_mask(u, v, 4, r, r * math.cos(math.pi / 4))
    if shape.kind == "triangle":
        return _star_mask(u, v, 3, r, r * math.cos(math.pi / 3))
    if shape.kind == "star":
        return _star_mask(u, v, 5, r, r * 0.45)
    if shape.kind == "line":
        return (u.abs() <= r) & (v.abs() <= shape.aspect / 2)
    if shape.kind == "ellipse":
        return (u / r) ** 2 + (v / (r * shape.aspect)) ** 2 <= 1
    if shape.kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (r * 0.7) ** 2)
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def _background(plan: ScenePlan, spec: Domain) -> Tensor:
    h, w = plan.size
    smooth = torch.nn.functional.interpolate(
        plan.texture[None], size=(h, w), mode="bilinear", align_corners=False
    )[0]
    base = torch.tensor(spec.background).view(3, 1, 1)
    image = base + spec.texture_contrast * (smooth - 0.5) * 2
    if spec.stripes:
        xs, ys = _grid(plan.size)
        along = xs * math.cos(plan.stripe_angle) + ys * math.sin(plan.stripe_angle)
        image = image + spec.stripes * torch.sin(along / 3.0 + plan.stripe_phase)
    return image


def _box_of(mask: Tensor) -> list[float]:
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return [float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1]


def render(plan: ScenePlan, draw_objects: bool = True) -> Scene:
    """The pixels and ground truth of ``plan``; without its labelled objects if ``draw_objects`` is False."""
    spec = domain(plan.domain)
    image = _background(plan, spec)
    for shape in plan.clutter:
        mask = shape_mask(shape, plan.size)
        image = torch.where(mask, torch.tensor(shape.colour).view(3, 1, 1), image)
    boxes, labels = [], []
    for shape in plan.objects:
        mask = shape_mask(shape, plan.size)
        if not bool(mask.any()):
            continue
        boxes.append(_box_of(mask))
        labels.append(shape.label)
        if draw_objects:
            image = torch.where(mask, torch.tensor(shape.colour).view(3, 1, 1), image)
    image = (image + plan.noise).clamp(0, 1)
    return Scene(
        image.contiguous(),
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
    )


def make_scene(seed: int, domain_name: str = "val") -> Scene:
    """The scene ``(seed, domain_name)``: always the same pixels and boxes."""
    return render(plan_scene(seed, domain_name))


def make_scenes(count: int, domain_name: str = "val", first_seed: int = 0) -> list[Scene]:
    """``count`` scenes of a domain, seeds ``first_seed, first_seed + 1, ...``."""
    return [make_scene(first_seed + i, domain_name) for i in range(count)]
