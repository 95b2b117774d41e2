"""Tensor helpers shared by the model families: all device-side, no host sync."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import roi_align

from pyodlog.monitoring.deferred import PARSE_SETTINGS
from pyodlog.monitoring.modes import captured, refuse_cuda_graphs
from pyodlog.ops.postprocess import postprocess_detections_near_miss
from pyodlog.ops.uncertainty import detection_uncertainty
from pyodlog.structures import DetectionBatch, NearMissBatch

__all__ = [
    "PairBoxes",
    "ReturnedDetections",
    "UncertaintyColumns",
    "as_compared",
    "captured",
    "clip_and_resize",
    "first_rows",
    "gather_rows",
    "host_tensor",
    "image_sizes_of",
    "level_roi_features",
    "local_index",
    "logged_boxes",
    "match_detections",
    "near_misses_of",
    "output_only_batch",
    "reads_calls_as",
    "refuse_cuda_graphs",
    "returned_detections",
    "rows_of_images",
    "sizes_tensor",
    "torchvision_output_only",
    "with_uncertainty",
]


# -- execution modes ----------------------------------------------------------------------------


def parts(model: nn.Module) -> Any:
    """``model`` for reading its parts: torchvision's detectors keep them as plain attributes
    (``roi_heads``, ``head``, ``box_coder``, …) that ``nn.Module`` does not declare.

    In a deferred parse (:mod:`pyodlog.monitoring.deferred`) of a call of ``model``: a view whose
    thresholds (the logger's ``parse_settings``) are those of that call, whatever was set since."""
    settings = PARSE_SETTINGS.get()
    if settings is not None and settings.core is model:
        return settings.view
    return model


def host_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of host values on ``device`` without stalling the device
    (pinned memory + non-blocking copy on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def rows_of_images(counts: Sequence[int], device: torch.device) -> Tensor:
    """``Tensor[sum(counts)]``: the image of each row when images' rows are concatenated
    (read only: a small one is shared by the calls of the same ``counts``)."""
    key = tuple(int(n) for n in counts)
    if sum(key) <= _CACHED_ROWS:
        return _cached_rows_of_images(key, device)
    return _rows_of_images(key, device)


#: Row indexes up to this many rows (512 KiB) are kept for reuse; larger ones are cheap to make
#: next to the work over their rows, and keeping them would hold megabytes per input shape.
_CACHED_ROWS = 65_536


def _rows_of_images(counts: tuple[int, ...], device: torch.device) -> Tensor:
    if not counts:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(
        [torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)]
    )


@functools.lru_cache(maxsize=32)
def _cached_rows_of_images(counts: tuple[int, ...], device: torch.device) -> Tensor:
    """:func:`rows_of_images` of a few rows, made once per ``counts`` (read only: reused)."""
    return _rows_of_images(counts, device)


def sizes_tensor(sizes: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """``Tensor[B, 2]`` int64 of (h, w) per image on ``device``, made once per distinct sizes
    (read only), without waiting for the device."""
    return _constant(tuple((int(h), int(w)) for h, w in sizes), torch.long, device)


def first_rows(rows_per_image: Sequence[int], device: torch.device) -> Tensor:
    """``Tensor[B]`` int64: the first row of each image when images' rows are concatenated
    (read only, made once per distinct counts)."""
    counts = [int(n) for n in rows_per_image]
    return _constant(tuple(sum(counts[:i]) for i in range(len(counts))), torch.long, device)


def gather_rows(table: Tensor, candidates: Tensor) -> Tensor:
    """``table[candidates]`` for ``candidates`` ``Tensor[B, D]`` with -1 padding (zeros there)."""
    b, d = candidates.shape
    width = table.shape[1:]
    if table.shape[0] == 0 or candidates.numel() == 0:
        return table.new_zeros((b, d, *width))
    valid = candidates >= 0
    rows = table.index_select(0, candidates.clamp(min=0).reshape(-1)).reshape(b, d, *width)
    if candidates.device.type == "cpu" and bool(valid.all()):
        return rows  # nothing to zero (the CPU reads the mask for free; a device would wait)
    mask = valid.reshape(b, d, *([1] * len(width)))
    return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def local_index(candidates: Tensor, first_row: Tensor) -> Tensor:
    """Global candidate rows -> rows within each image (``first_row``: ``Tensor[B]``); -1 stays -1."""
    return torch.where(candidates >= 0, candidates - first_row[:, None], candidates)


def _pool_1x1(feature: Tensor, rois: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """RoIAlign of ``rois`` to 1x1 (2x2 samples) on one level's map: ``Tensor[R, F]``."""
    return roi_align(
        feature,
        rois,
        output_size=1,
        spatial_scale=feature.shape[-1] / padded_size[1],
        sampling_ratio=2,
        aligned=True,
    ).flatten(1)


def level_roi_features(
    features: list[Tensor],
    boxes: Tensor,
    level: Tensor,
    padded_size: tuple[int, int],
    every_level: bool = False,
) -> Tensor:
    """An RoI-pooled feature per detection from the FPN level it was detected on.

    Args:
        features: per level ``Tensor[B, F, h, w]`` (all levels with F channels).
        boxes: ``Tensor[B, D, 4]`` xyxy in network-input coordinates.
        level: ``Tensor[B, D]`` level of each detection (-1 in padding).
        padded_size: (h, w) of the padded batch the features were computed on.
        every_level: pool every RoI on every level and pick its own (what a device does, with
            no compaction); on the CPU, by default, each RoI is pooled on its level only (the
            same values).

    Returns:
        ``Tensor[B, D, F]``: RoIAlign to 1x1 (2x2 samples) on the level's map.
    """
    b, d, _ = boxes.shape
    if b * d == 0:
        return boxes.new_zeros((b, d, features[0].shape[1]))
    batch_index = torch.arange(b, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(
        b, d, 1
    )
    rois = torch.cat([batch_index, boxes], dim=2).reshape(-1, 5).to(features[0].dtype)
    if boxes.device.type == "cpu" and not every_level:
        # Each RoI pooled on its own level only (RoIAlign pools each RoI on its own: the same
        # values as pooling every RoI on every level and picking), a fifth of the work on five
        # levels. (On a device the compaction would wait for it: every level pooled, as below.)
        flat = level.reshape(-1)
        parts = []
        for lvl, f in enumerate(features):
            index = (flat == lvl).nonzero().squeeze(1)
            # (Every level pooled, an empty one too: the output's dtype is roi_align's, e.g.
            # float32 for bfloat16 features under CPU autocast.)
            parts.append((index, _pool_1x1(f, rois.index_select(0, index), padded_size)))
        out = parts[0][1].new_zeros((b * d, parts[0][1].shape[1]))
        for index, pooled_level in parts:
            out.index_copy_(0, index, pooled_level)
        return out.reshape(b, d, -1)
    pooled = torch.stack([_pool_1x1(f, rois, padded_size) for f in features])  # [L, B*D, F]
    flat_level = level.reshape(-1).clamp(min=0)
    picked = pooled[flat_level, torch.arange(b * d, device=boxes.device)]
    return torch.where(
        (level.reshape(-1) >= 0)[:, None],
        picked,
        torch.zeros((), dtype=picked.dtype, device=picked.device),
    ).reshape(b, d, -1)


# -- the returned detections as truth -------------------------------------------


class ReturnedDetections(NamedTuple):
    """What a torchvision-style detector returned, padded to ``D`` (the most of any image).

    Attributes:
        boxes: ``Tensor[B, D, 4]`` xyxy, zeros in padding.
        scores: ``Tensor[B, D]``, zeros in padding.
        labels: ``Tensor[B, D]`` int64, -1 in padding.
        counts: ``Tensor[B]`` int64 detections per image.
        lengths: the same counts as host ints (read from shapes, no device access).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    counts: Tensor
    lengths: list[int]


def returned_detections(output: Any, n_images: int, method: str) -> ReturnedDetections:
    """Pads a detector's ``[{"boxes", "scores", "labels"}, ...]`` output into batch tensors.

    Lengths come from tensor shapes (host metadata), so nothing waits for the
    device; one copy per field, no Python loop over detections.

    Raises:
        TypeError: ``output`` is not one such dict per image (``method`` names
            the logger method that received it).
    """
    if (
        not isinstance(output, (list, tuple))
        or len(output) != n_images
        or not all(
            isinstance(o, Mapping)
            and all(isinstance(o.get(k), Tensor) for k in ("boxes", "scores", "labels"))
            for o in output
        )
    ):
        raise TypeError(
            f"{method} expects the model to return one dict with 'boxes', 'scores' and 'labels' tensors per image "
            f"({n_images} images), got {type(output).__name__}: a model whose forward returns something else needs "
            "its own logger subclass"
        )
    lengths = [int(o["scores"].shape[0]) for o in output]
    device = output[0]["scores"].device
    if len(output) == 1:  # one image: nothing to pad (copies all the same, as pad_sequence makes)
        o = output[0]
        return ReturnedDetections(
            o["boxes"].reshape(1, -1, 4).clone(),
            o["scores"].reshape(1, -1).clone(),
            o["labels"].reshape(1, -1).to(torch.long, copy=True),
            host_tensor(lengths, torch.long, device),
            lengths,
        )
    boxes = pad_sequence([o["boxes"].reshape(-1, 4) for o in output], batch_first=True)
    scores = pad_sequence([o["scores"] for o in output], batch_first=True)
    labels = pad_sequence(
        [o["labels"].to(torch.long) for o in output], batch_first=True, padding_value=-1
    )
    return ReturnedDetections(
        boxes, scores, labels, host_tensor(lengths, torch.long, device), lengths
    )


def _narrower(candidate: torch.dtype, returned: torch.dtype) -> torch.dtype:
    """The dtype two floating tensors are compared in: the returned one when it holds fewer bits."""
    if not returned.is_floating_point or candidate == returned:
        return candidate
    return returned if torch.finfo(returned).bits < torch.finfo(candidate).bits else candidate


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def clip_and_resize(
    boxes: Tensor,
    rows_per_image: Sequence[int],
    clip_sizes: Sequence[tuple[int, int]] | None,
    from_sizes: Sequence[tuple[int, int]],
    to_sizes: Sequence[tuple[int, int]],
) -> Tensor:
    """Boxes clipped to ``clip_sizes`` and rescaled ``from_sizes`` -> ``to_sizes``, per image.

    The same arithmetic as torchvision's ``box_ops.clip_boxes_to_image`` and
    ``transform.resize_boxes`` (the ratio a float32 division, the product in
    float32 or wider, then cast back; on CUDA, float16/bfloat16 boxes are multiplied
    by the ratio rounded to their dtype, as PyTorch does there), so applied to a detector's candidates it
    gives bit for bit the boxes the detector returns. The ratios are computed on
    the host and copied without waiting for the device.

    Args:
        boxes: ``Tensor[N, 4]`` or ``Tensor[N, C, 4]`` xyxy, the rows of image 0 first.
        rows_per_image: how many rows each image has (sums to N).
        clip_sizes: (h, w) per image to clip to (the network input), or None.
        from_sizes, to_sizes: (h, w) per image the boxes are in / are brought to.

    Returns:
        A tensor of ``boxes``' shape and dtype.
    """
    device, dtype = boxes.device, boxes.dtype
    shape = boxes.shape
    ratios = [
        (np.float32(t[1]) / np.float32(f[1]), np.float32(t[0]) / np.float32(f[0]))
        for f, t in zip(from_sizes, to_sizes)
    ]
    compute = _compute_dtype(dtype)
    trailing = [1] * (boxes.dim() - 2)
    # torchvision multiplies the boxes by a 0-dim float32 tensor on their device: on the CPU that
    # acts as a scalar (exact float32), on CUDA it is first cast to the boxes' dtype
    # (float16/bfloat16), and the product then rounds from that rounded ratio.
    ratio_dtype = dtype if device.type != "cpu" and compute != dtype else torch.float32
    if len(set(ratios)) == 1 and (clip_sizes is None or len(set(map(tuple, clip_sizes))) == 1):
        # Every image alike (always so for one image): one row broadcast, no per-row gather.
        if clip_sizes is not None:
            h, w = clip_sizes[0]
            limit = _constant((w, h, w, h), dtype, device)
            boxes = torch.clamp(boxes, min=_constant((0,), dtype, device), max=limit)
        if ratios[0] == (1.0, 1.0):  # x * 1 is x, in any float dtype
            return boxes.reshape(shape)
        rw, rh = ratios[0]
        ratio = _constant((float(rw), float(rh), float(rw), float(rh)), torch.float32, device)
        return (boxes.to(compute) * ratio.to(ratio_dtype).to(compute)).to(dtype).reshape(shape)
    image = rows_of_images(rows_per_image, device)
    if clip_sizes is not None:
        hw = host_tensor(clip_sizes, torch.long, device).to(dtype)[image]  # [N, 2]
        limit = hw.flip(-1).repeat(1, 2).reshape(-1, *trailing, 4)
        boxes = torch.clamp(boxes, min=torch.zeros((), dtype=dtype, device=device), max=limit)
    ratio = host_tensor(ratios, torch.float32, device).to(ratio_dtype).to(compute)[image]  # [N, 2]
    ratio = ratio.repeat(1, 2).reshape(-1, *trailing, 4)
    return (boxes.to(compute) * ratio).to(dtype).reshape(shape)


@functools.lru_cache(maxsize=512)
def _constant(values: tuple[Any, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small read-only tensor of host values on ``device``, made once (reused by every call)."""
    return host_tensor(list(values), dtype, device)


_MASKS = {k: (1 << (64 - k)) - 1 for k in (27, 30, 31)}
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplication, logical shifts)."""
    x = x ^ ((x >> 30) & _MASKS[30])
    x = x * _M1
    x = x ^ ((x >> 27) & _MASKS[27])
    x = x * _M2
    return x ^ ((x >> 31) & _MASKS[31])


def _bits(t: Tensor) -> Tensor:
    """The bit pattern of each float as int64 (equal bits: the same value, -0.0 and NaN payloads apart)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(view).to(torch.int64)


def _box_key(boxes: Tensor) -> Tensor:
    """A 64-bit hash of each box's four coordinates: ``Tensor[..., 4]`` -> ``Tensor[...]``.

    The coordinates' bytes are read as 64-bit words (two per float32 box, one per float16 or
    bfloat16 box, four per float64 box): one mix per word, not one per coordinate."""
    words = boxes.contiguous().view(torch.int64)
    key = _mix(words[..., 0])
    for i in range(1, words.shape[-1]):
        key = _mix(key ^ words[..., i])
    return key


# Spare scatter slots for the pairs that match no detection on CUDA (a power of two).
_SPARE_SLOTS = 1024


class PairBoxes:
    """Candidate boxes a match computes only for the (candidate, class) pairs it reads.

    :func:`match_detections` reads the box of each pair scoring at least an image's lowest
    returned score: a few hundred, where the full ``Tensor[N, C, 4]`` of a two-stage detector
    decodes every class of every proposal and a one-stage detector every anchor. A call whose
    full boxes nothing else reads (a sampled-out call: no near-misses) passes this instead.

    ``of(image, rows, labels)``: ``Tensor[P, 4]``, the boxes of pairs ``(rows[i], labels[i])``
    (rows within ``image``'s candidates, in ascending order), computed as the full tensor
    computes them, element by element (torchvision's box coders and :func:`clip_and_resize` are
    elementwise);
    ``full()``: the full boxes (``Tensor[N, 4]`` or ``[N, C, 4]``, :func:`match_detections`'s
    ``boxes``), which the match falls back to on CUDA and when a detection finds no pair.
    """

    __slots__ = ("full", "of")

    def __init__(
        self, of: Callable[[int, Tensor, Tensor], Tensor], full: Callable[[], Tensor]
    ) -> None:
        self.of = of
        self.full = full


def match_detections(
    returned: ReturnedDetections,
    scores: Tensor,
    boxes: Tensor | PairBoxes,
    rows_per_image: Sequence[int],
    first_label: int = 0,
) -> Tensor:
    """Which candidate each returned detection came from: the log takes the model's detections as truth.

    A detector's returned detection ``(box, score, label)`` is one candidate
    ``n`` with ``scores[n, label] == score`` and box ``boxes[n]`` (or
    ``boxes[n, label]``) equal to it, bit for bit. This finds that candidate
    for every detection at once: each (candidate, class) pair scoring at least
    the image's lowest returned score gets a 64-bit key of its (label, score,
    box), looked up among the detections' keys (sorted, ``searchsorted``:
    O(P log D) for P such pairs and D detections, after one O(N C) comparison),
    and the lowest matching pair wins; a match is then
    checked field by field, so a hash collision can only leave a detection
    unmatched, never matched wrongly. Tied scores do not matter: the box and
    label pick the candidate the model picked. Candidates identical in box,
    score and label are indistinguishable; the lowest row is reported.

    Mixed precision: the comparison is made in the precision the model
    produced, the narrower of the returned and the candidates' dtypes (under
    autocast, or for a model that casts its output to float16/bfloat16, the
    candidates are rounded to the returned dtype first; widening is exact).

    Tensor operations only (a loop over images, none over detections), no host
    synchronisation on CUDA. Only pairs scoring at least the image's lowest
    returned score can match: on the CPU only those are keyed; on CUDA all are,
    masked (no compaction, so no sync).

    Args:
        returned: the model's detections (:func:`returned_detections`), boxes in
            the coordinates of ``boxes``.
        scores: ``Tensor[N, C]`` activated class scores, computed exactly as the model does.
        boxes: ``Tensor[N, 4]`` or ``Tensor[N, C, 4]`` candidate boxes as the model
            returns them (clipped and resized: :func:`clip_and_resize`), or a
            :class:`PairBoxes` that computes only the boxes of the pairs keyed (on the CPU;
            when a detection that is not NaN stays unmatched, the match is made again on
            ``full()``, so the rows are those of the full boxes).
        rows_per_image: candidate rows of each image (image 0's first).
        first_label: classes below this are never detected (background).

    Returns:
        ``Tensor[B, D]`` int64: the row of ``scores`` of each detection, -1 in
        padding and for a detection no candidate reproduces.
    """
    n_images, d = returned.scores.shape
    device = scores.device
    out = torch.full((n_images, d), -1, dtype=torch.long, device=device)
    if d == 0 or scores.shape[0] == 0:
        return out
    n_class = scores.shape[1]
    lazy = boxes if isinstance(boxes, PairBoxes) else None
    if lazy is not None and device.type != "cpu":
        boxes, lazy = lazy.full(), None  # CUDA keys every pair (no compaction): all the boxes
    # Compared in the precision the model produced: the narrower of the returned and the
    # candidates' dtype (a model that casts its output down, e.g. to bfloat16, returns values the
    # float32 candidates only equal once rounded the same way; widening is exact either way).
    scores = scores.to(_narrower(scores.dtype, returned.scores.dtype))
    det_scores = returned.scores.to(scores.dtype)
    det_boxes = returned.boxes
    if lazy is None:
        assert isinstance(boxes, Tensor)
        per_class = boxes.dim() == 3
        boxes = boxes.to(_narrower(boxes.dtype, returned.boxes.dtype))
        det_boxes = det_boxes.to(boxes.dtype)
    det_labels = returned.labels
    det_score_bits = _bits(det_scores)
    det_key = (  # [B, D] (with PairBoxes: per image, once the candidates' box dtype is known)
        _mix(_mix(_box_key(det_boxes) ^ det_labels) ^ det_score_bits) if lazy is None else None
    )
    valid = torch.arange(d, device=device)[None, :] < returned.counts[:, None]
    labels = torch.arange(first_label, n_class, device=device)
    start = 0
    for b, n_rows in enumerate(rows_per_image):
        rows = slice(start, start + int(n_rows))
        start += int(n_rows)
        if n_rows == 0 or returned.lengths[b] == 0:
            continue
        by_row = scores[rows, first_label:]  # [n, C']
        img_scores = by_row.reshape(-1)  # [n * C'] pair scores
        # Only a pair whose score is one of the image's returned scores can match (bit-equal
        # values), so only a pair scoring at least the lowest returned score needs a key: one
        # comparison per pair (a pass the model's own score threshold makes too), no sort of the
        # pairs (torch.isin sorted all of them: 0.65 s of RetinaNet's 9 M pairs). (Padding is
        # +inf, above every score: no boolean indexing, so no sync on CUDA.)
        # (A NaN returned score matches no pair; it must not make the lowest NaN for the others.)
        lowest = torch.where(valid[b] & ~det_scores[b].isnan(), det_scores[b], float("inf")).amin()
        if device.type == "cpu":
            # The CPU compacts for free: first the rows holding such a pair (a row's best score;
            # NaN rows kept, a NaN compares false only itself), then the pairs of those rows.
            best_of_row = by_row.amax(1) if by_row.shape[1] else by_row.new_zeros(by_row.shape[0])
            near = ((best_of_row >= lowest) | best_of_row.isnan()).nonzero().squeeze(1)
            inner = (by_row[near] >= lowest).nonzero()
            pair = near[inner[:, 0]] * by_row.shape[1] + inner[:, 1]  # ascending, as a flat scan
        else:
            keep = img_scores >= lowest
            pair = torch.arange(keep.numel(), device=device)
        n_pairs = img_scores.numel()
        row, cls = pair // labels.shape[0], pair % labels.shape[0]
        if lazy is not None:
            if pair.numel() == 0:
                continue  # no pair scores as high as a returned detection: none matches
            pair_boxes = lazy.of(b, row, cls + first_label)
            box_dtype = _narrower(pair_boxes.dtype, returned.boxes.dtype)
            pair_boxes, img_det_boxes = pair_boxes.to(box_dtype), det_boxes[b].to(box_dtype)
            img_det_key = _mix(_mix(_box_key(img_det_boxes) ^ det_labels[b]) ^ det_score_bits[b])
            box_key = _box_key(pair_boxes)
        else:
            assert isinstance(boxes, Tensor) and det_key is not None
            img_boxes, img_det_boxes, img_det_key = boxes[rows], det_boxes[b], det_key[b]
            if per_class:
                box_key = _box_key(img_boxes[row, cls + first_label])
            elif device.type == "cpu":
                box_key = _box_key(img_boxes[row])
            else:
                # Every pair keyed (no compaction): each box hashed once, not once per class (the
                # same keys; a one-stage head at 800 px has 91 classes on each of ~160 k anchors).
                box_key = _box_key(img_boxes)[row]
        pair_scores = img_scores[pair] if device.type == "cpu" else img_scores  # (CUDA: every pair)
        pair_key = _mix(_mix(box_key ^ labels[cls]) ^ _bits(pair_scores))
        sorted_keys, _ = img_det_key.sort()
        pos = torch.searchsorted(sorted_keys, pair_key).clamp(max=d - 1)
        hit = sorted_keys[pos] == pair_key
        if device.type != "cpu":
            hit &= keep
        # Pairs that hit no detection go to spare slots after the D real ones. On CUDA every
        # pair is keyed (no compaction, no sync): one shared spare slot would take millions of
        # atomic updates on one address per image (RetinaNet at 800 px, batch 8, on an H200:
        # 2 s a call), so they are spread over _SPARE_SLOTS slots by pair index.
        spare = 1 if device.type == "cpu" else _SPARE_SLOTS
        best = torch.full((d + spare,), n_pairs, dtype=torch.long, device=device)
        miss = d if spare == 1 else d + (pair & (spare - 1))
        best.scatter_reduce_(0, torch.where(hit, pos, miss), pair, "amin", include_self=True)
        found = best[torch.searchsorted(sorted_keys, img_det_key)]  # [D] pair index or sentinel
        ok = found < n_pairs
        found = found.clamp(max=n_pairs - 1)
        f_row, f_cls = found // labels.shape[0], found % labels.shape[0] + first_label
        if lazy is not None:  # the found pair's box: among the pairs keyed (ascending)
            f_box = pair_boxes[torch.searchsorted(pair, found).clamp(max=pair.numel() - 1)]
        else:
            f_box = img_boxes[f_row, f_cls] if per_class else img_boxes[f_row]
        ok &= (
            valid[b]
            & (f_cls == det_labels[b])
            & (_bits(scores[rows][f_row, f_cls]) == _bits(det_scores[b]))
            & (_bits(f_box) == _bits(img_det_boxes)).all(-1)
        )
        out[b] = torch.where(ok, f_row + rows.start, -1)
    if lazy is not None and bool((valid & (out < 0) & ~det_scores.isnan()).any()):
        # A detection no pair reproduced: made again on the full boxes (the rows are theirs).
        return match_detections(returned, scores, lazy.full(), rows_per_image, first_label)
    return out


def reads_calls_as(logger: Any, family: type, methods: Sequence[str]) -> bool:
    """Whether ``logger`` reads a call as its ``family`` does: it overrides none of ``methods``
    (e.g. a subclass whose parse remaps labels does not; its output alone is not what it logs)."""
    cls = type(logger)
    return all(getattr(cls, name) is getattr(family, name) for name in methods)


def output_only_batch(
    returned: ReturnedDetections, boxes: Tensor, img_sizes: Sequence[tuple[int, int]]
) -> DetectionBatch:
    """A model's returned detections alone (``boxes`` in ``img_sizes`` coordinates): what a call
    sampled out with ``Sampling(sampled_out_aggregates="output")`` adds to the aggregates (no
    parse: no logits, candidates, embeddings nor uncertainty)."""
    b, d = returned.scores.shape
    return DetectionBatch(
        boxes,
        returned.scores,
        returned.labels,
        returned.scores.new_zeros((b, d, 0)),
        torch.full((b, d), -1, dtype=torch.long, device=returned.scores.device),
        returned.counts,
        list(img_sizes),
        output_only=True,
    )


def torchvision_output_only(
    logger: Any, family: type, output: Any, img_sizes: Sequence[tuple[int, int]]
) -> DetectionBatch | None:
    """:func:`output_only_batch` of a torchvision detector's ``[{"boxes", "scores", "labels"}]``
    (copied), or None (the call is then parsed) for a ``logger`` that reads its calls otherwise
    than its ``family`` (its parse, its input sizes or how it runs the model).

    Raises:
        TypeError: ``output`` is not one ``{"boxes", "scores", "labels"}`` dict per image.
    """
    if not reads_calls_as(
        logger, family, ("_parse_model_output", "_call_image_sizes", "_run_model")
    ):
        return None
    input_sizes = logger._state.get("input_sizes")  # the sizes the model resizes its boxes to
    if input_sizes is None:
        return None
    returned = returned_detections(
        output, len(img_sizes), f"{type(logger).__name__}._output_only_detections"
    )
    return output_only_batch(returned, logged_boxes(returned, input_sizes, img_sizes), img_sizes)


def logged_boxes(
    returned: ReturnedDetections,
    input_sizes: Sequence[tuple[int, int]],
    img_sizes: Sequence[tuple[int, int]],
) -> Tensor:
    """The returned boxes in ``img_sizes`` coordinates (themselves when those are the input sizes)."""
    if [tuple(s) for s in img_sizes] == [tuple(s) for s in input_sizes]:
        return returned.boxes
    n_images, d, _ = returned.boxes.shape
    return clip_and_resize(
        returned.boxes.reshape(-1, 4), [d] * n_images, None, input_sizes, img_sizes
    ).reshape(n_images, d, 4)


def image_sizes_of(images: Any) -> list[tuple[int, int]]:
    """(h, w) of each image of a list of ``[C, H, W]`` tensors or a ``[B, C, H, W]`` tensor."""
    return [(int(img.shape[-2]), int(img.shape[-1])) for img in images]


# -- near-misses and uncertainty ------------------------------------------------------------------


class UncertaintyColumns(TypedDict, total=False):
    """The uncertainty keyword arguments of a :class:`~pyodlog.structures.DetectionBatch`."""

    entropy: Tensor
    margin: Tensor
    energy: Tensor


def as_compared(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` as torch compares it with a tensor of ``dtype`` (``scores > threshold``):
    rounded to ``dtype`` when that is narrower than float64 (exactly representable afterwards)."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return float(threshold)
    return float(torch.tensor(float(threshold), dtype=torch.float64).to(dtype).item())


def with_uncertainty(logits: Tensor, kind: int | None) -> UncertaintyColumns:
    """``{"entropy", "margin", "energy"}`` of logit rows (:func:`pyodlog.ops.detection_uncertainty`),
    or ``{}`` when ``kind`` is None (a family that does not say how its head activates)."""
    if kind is None:
        return {}
    u = detection_uncertainty(logits, kind)
    return {"entropy": u.entropy, "margin": u.margin, "energy": u.energy}


def near_misses_of(
    returned: ReturnedDetections,
    matched: Tensor,
    scores: Tensor,
    boxes: Tensor,
    rows_per_image: Sequence[int],
    net_sizes: Sequence[tuple[int, int]],
    input_sizes: Sequence[tuple[int, int]],
    img_sizes: Sequence[tuple[int, int]],
    logits: Tensor,
    *,
    k: int,
    floor: float | None,
    score_thresh: float,
    iou_thresh: float,
    max_detections: int,
    first_label: int = 0,
    min_size: float = 0.0,
    topk: int = -1,
    topk_group: Tensor | None = None,
    topk_per_class: bool = False,
    clip: bool = True,
    uncertainty_kind: int | None = None,
    embeddings: Callable[[Tensor], Tensor] | None = None,
    activation: str = "none",
    centerness: Tensor | None = None,
) -> NearMissBatch:
    """The near-misses of a batch, from the candidates the model post-processed (one fused pass).

    Runs :func:`pyodlog.ops.postprocess_detections_near_miss` on the model's candidates with the
    model's own settings: its detections are the model's (:func:`match_detections` found them
    among the same candidates), its near-misses are every other pair above the floor, the first
    ``k`` of each image by score. What a logger subclass must provide for its family to log
    near-misses is exactly these arguments.

    Args:
        returned: the model's detections (:func:`returned_detections`), in ``input_sizes`` coordinates.
        matched: ``Tensor[B, D]`` the row of ``scores`` of each returned detection (:func:`match_detections`).
        scores: ``Tensor[N, C]`` activated class scores of every candidate, as the model computes them.
        boxes: ``Tensor[N, 4]`` or ``Tensor[N, C, 4]`` decoded boxes in network-input coordinates
            (not clipped: the operator clips them to ``net_sizes``).
        rows_per_image: candidate rows of each image (image 0's first).
        net_sizes, input_sizes, img_sizes: (h, w) per image the network saw, the model resizes
            its boxes back to, and the logged boxes refer to.
        logits: ``Tensor[N, C]`` the logit vector of each candidate (logged per near-miss).
        k, floor: near-misses per image; the lowest score (exclusive) of a below-score one
            (None: half of ``score_thresh``).
        score_thresh, iou_thresh, max_detections, first_label, min_size, topk, topk_group,
            topk_per_class, clip: the model's post-processing (see
            :func:`pyodlog.ops.postprocess_detections`; ``clip``: the model clips its boxes to
            the network input).
        uncertainty_kind: :data:`pyodlog.ops.uncertainty.SOFTMAX` or ``SIGMOID`` (None: no columns).
        embeddings: ``fn(rows)`` -> ``Tensor[B, K, E]`` embedding of candidate rows ``Tensor[B, K]``
            (-1 in padding), or None.
        activation, centerness: with ``activation`` other than ``"none"``, ``scores`` are raw
            logits the operator activates (see :func:`pyodlog.ops.postprocess_detections`).

    Returns:
        :class:`~pyodlog.structures.NearMissBatch`.
    """
    device = scores.device
    floor = score_thresh / 2 if floor is None else floor
    # Under autocast a head's scores and decoded boxes can differ in dtype: the operator takes one.
    common = torch.promote_types(scores.dtype, boxes.dtype)
    # The model compares its scores with its thresholds in the scores' own dtype (torch rounds
    # the threshold to it: 0.3 is 0.30005 in float16); rounded so here, the operator compares
    # the promoted scores as the model did.
    out = postprocess_detections_near_miss(
        scores.to(common),
        boxes.to(common),
        rows_of_images(rows_per_image, device),
        sizes_tensor(net_sizes, device),
        sizes_tensor(input_sizes, device),
        as_compared(score_thresh, scores.dtype),
        iou_thresh,
        max_detections,
        k,
        as_compared(floor, scores.dtype),
        first_label=first_label,
        min_size=min_size,
        topk=topk,
        topk_group=topk_group,
        topk_per_class=topk_per_class,
        clip=clip,
        activation=activation,
        centerness=None if centerness is None else centerness.to(common),
    )
    det, nm = out.detections, out.near_misses
    n_images = len(rows_per_image)
    nm_boxes = nm.boxes
    if [tuple(s) for s in img_sizes] != [tuple(s) for s in input_sizes]:
        nm_boxes = clip_and_resize(
            nm_boxes.reshape(-1, 4), [k] * n_images, None, input_sizes, img_sizes
        ).reshape(n_images, k, 4)
    # The suppressor as a row of the logged (returned) detections: the operator's detection of
    # the same candidate and class.
    suppressed_by = nm.suppressed_by
    if returned.scores.shape[1] and det.candidates.shape[1] and k:
        at = suppressed_by.clamp(min=0)
        cand, lab = det.candidates.gather(1, at), det.labels.gather(1, at)  # [B, K]
        valid = (
            torch.arange(returned.scores.shape[1], device=device)[None, :]
            < returned.counts[:, None]
        )
        same = (
            (matched[:, None, :] == cand[:, :, None])
            & (returned.labels[:, None, :] == lab[:, :, None])
            & valid[:, None, :]
        )  # [B, K, D]
        row = same.to(torch.int8).argmax(-1)
        suppressed_by = torch.where((suppressed_by >= 0) & same.any(-1), row, -1)
    else:
        suppressed_by = torch.full_like(suppressed_by, -1)
    first_row = first_rows(rows_per_image, device)
    nm_logits = gather_rows(logits, nm.candidates)
    return NearMissBatch(
        boxes=nm_boxes,
        scores=nm.scores,
        labels=nm.labels,
        logits=nm_logits,
        candidate_index=local_index(nm.candidates, first_row),
        counts=nm.counts,
        reason=nm.reason,
        suppressed_by=suppressed_by,
        suppressor_iou=nm.suppressor_iou,
        exhausted=nm.exhausted,
        floor=float(floor),
        k=int(k),
        score_thresh=float(score_thresh),
        iou_thresh=float(iou_thresh),
        max_detections=int(max_detections),
        embeddings=None if embeddings is None else embeddings(nm.candidates),
        **with_uncertainty(nm_logits, uncertainty_kind),
        score_dtype=str(scores.dtype).removeprefix("torch."),
    )
