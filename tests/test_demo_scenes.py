"""The demo's scene generator: deterministic, and its boxes are exactly where the objects are drawn."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pyodlog.demokit.scenes import CLASS_NAMES, DOMAINS, make_scene, plan_scene, render


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_same_seed_gives_the_same_scene_and_another_seed_another(domain):
    first, again, other = make_scene(3, domain), make_scene(3, domain), make_scene(4, domain)
    assert torch.equal(first.image, again.image)
    assert torch.equal(first.boxes, again.boxes)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.image, other.image)
    assert first.image.dtype == torch.float32 and first.image.shape == (3, 160, 160)
    assert float(first.image.min()) >= 0.0 and float(first.image.max()) <= 1.0


def test_val_and_deploying_differ_for_the_same_seed():
    assert not torch.equal(make_scene(0, "val").image, make_scene(0, "deploying").image)


def test_the_deploying_domain_is_shifted_to_smaller_objects_and_more_of_them():
    val = [make_scene(s, "val") for s in range(20)]
    deploying = [make_scene(s, "deploying") for s in range(20)]

    def mean_side(scenes):
        boxes = torch.cat([s.boxes for s in scenes])
        return float(((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])).mean() / 2)

    assert mean_side(deploying) < 0.8 * mean_side(val)
    assert sum(len(s.labels) for s in deploying) > sum(len(s.labels) for s in val)


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("seed", range(8))
def test_every_drawn_object_pixel_lies_in_its_box_and_the_box_is_tight(domain, seed):
    plan = plan_scene(seed, domain)
    # Objects recoloured black so that none can match the clutter beneath it (palettes may repeat).
    plan = dataclasses.replace(
        plan, objects=[dataclasses.replace(o, colour=(0.0, 0.0, 0.0)) for o in plan.objects]
    )
    scene = render(plan)
    without = render(plan, draw_objects=False)  # same background, clutter and noise
    assert torch.equal(scene.boxes, without.boxes)
    drawn = (scene.image != without.image).any(dim=0)  # [H, W]: the pixels the objects changed
    assert len(scene.labels) >= 1
    assert bool(((scene.labels >= 1) & (scene.labels < len(CLASS_NAMES))).all())
    inside_some_box = torch.zeros_like(drawn)
    for x1, y1, x2, y2 in scene.boxes.round().to(torch.int64).tolist():
        assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
        inside_some_box[y1:y2, x1:x2] = True
        region = drawn[y1:y2, x1:x2]
        # tight: the drawn pixels touch every side of the box
        assert bool(region[0].any() and region[-1].any()), (x1, y1, x2, y2)
        assert bool(region[:, 0].any() and region[:, -1].any()), (x1, y1, x2, y2)
        assert float(region.float().mean()) > 0.3  # a solid shape fills much of its box
    assert not bool((drawn & ~inside_some_box).any())  # nothing drawn outside the boxes
    # boxes do not overlap: each object is seen whole
    boxes = scene.boxes
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_an_unknown_domain_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="deploying"):
        make_scene(0, "production")
