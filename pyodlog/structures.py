"""What pyodlog records: per-image detections and the record of one logged call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from pyodlog.ops.compression import CompressedFeature

__all__ = [
    "BOX_FORMAT",
    "UNCERTAINTY_COLUMNS",
    "CallRecord",
    "DetectionBatch",
    "DetectionOutput",
    "NearMissBatch",
    "RecordStorage",
]

#: How every box pyodlog logs, stores and returns is written: ``(x1, y1, x2, y2)`` corners in
#: pixels of the original image (``img_sizes``), x to the right, y down (torchvision's ``"xyxy"``).
BOX_FORMAT = "xyxy"


#: Per-detection uncertainty columns (float32), logged by the families that compute them
#: (:func:`pyodlog.ops.detection_uncertainty`).
UNCERTAINTY_COLUMNS = ("entropy", "margin", "energy")


class DetectionOutput:
    """The detections of one image; every per-detection field has the same length.

    Like detectron2's ``Instances``: fields are checked for length when set, and
    indexing (a slice, a boolean mask, an index tensor) applies to all of them.

    Attributes:
        boxes: ``Tensor[N, 4]`` float32 boxes in :data:`BOX_FORMAT` (``box_format``), original-image
            pixel coordinates.
        scores: ``Tensor[N]``.
        labels: ``Tensor[N]`` int64.
        logits: ``Tensor[N, C]`` the full class vector the head produced for the
            candidate each detection came from.
        candidate_index: ``Tensor[N]`` int64, which pre-NMS candidate (row of the
            head's output for this image) each detection came from.
        embeddings: ``Tensor[N, D]`` or None, a per-detection feature.
        image_size: ``(height, width)`` of the original image.
    """

    _FIELDS = ("boxes", "scores", "labels", "logits", "candidate_index", "embeddings")
    box_format: ClassVar[str] = BOX_FORMAT

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    logits: Tensor
    candidate_index: Tensor
    embeddings: Tensor | None
    image_size: tuple[int, int]

    def __init__(
        self,
        boxes: Tensor,
        scores: Tensor,
        labels: Tensor,
        logits: Tensor,
        candidate_index: Tensor,
        image_size: tuple[int, int],
        embeddings: Tensor | None = None,
    ) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._n: int | None = None
        for name, value in (
            ("boxes", boxes),
            ("scores", scores),
            ("labels", labels),
            ("logits", logits),
            ("candidate_index", candidate_index),
            ("embeddings", embeddings),
        ):
            setattr(self, name, value)
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape [N, 4], got {tuple(self.boxes.shape)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._FIELDS and value is not None:
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
            n = value.shape[0] if value.dim() else None
            if n is None or (self._n is not None and n != self._n):
                raise ValueError(
                    f"{name} has {n} rows, but the other fields of this image have {self._n}"
                )
            object.__setattr__(self, "_n", n)
        object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return int(self._n or 0)

    def __getitem__(self, item) -> DetectionOutput:
        if isinstance(item, str):
            raise TypeError(
                f"DetectionOutput fields are attributes: use .{item}, not [{item!r}] "
                f"(indexing selects detections: a slice, a mask or indices)"
            )
        return DetectionOutput(
            self.boxes[item],
            self.scores[item],
            self.labels[item],
            self.logits[item],
            self.candidate_index[item],
            self.image_size,
            None if self.embeddings is None else self.embeddings[item],
        )

    def to(self, device) -> DetectionOutput:
        return DetectionOutput(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            self.logits.to(device),
            self.candidate_index.to(device),
            self.image_size,
            None if self.embeddings is None else self.embeddings.to(device),
        )

    def __repr__(self) -> str:
        extra = "" if self.embeddings is None else f", embeddings={tuple(self.embeddings.shape)}"
        return f"DetectionOutput(n={len(self)}, image_size={self.image_size}, n_class={self.logits.shape[-1]}{extra})"


@dataclass
class NearMissBatch:
    """The near-misses of a batch, padded to ``K`` per image (see :class:`pyodlog.ops.NearMisses`).

    The same per-row fields as :class:`DetectionBatch` (``boxes`` in original-image coordinates,
    ``scores``, ``labels``, ``logits``, ``candidate_index`` within the image, ``embeddings``, the
    uncertainty columns) plus ``reason`` (uint8: 1 below_score, 2 suppressed, 3 over_cap),
    ``suppressed_by`` (int64 detection row of the suppressor within the image's detections, -1 if
    none) and ``suppressor_iou`` (float32, NaN if none), and the envelope of the call: ``floor``
    (near-misses below the score threshold are above it), ``k`` (the budget per image),
    ``exhausted`` (``Tensor[B]`` bool: an image had more near-misses than ``k``) and the
    thresholds the detections were made with (``score_thresh``, ``iou_thresh``,
    ``max_detections``), and ``score_dtype``: the dtype the model compared its scores with the
    thresholds in (``"float16"`` or ``"bfloat16"`` for a half-precision head, whose thresholds
    round to that dtype; replay compares as it did).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    logits: Tensor
    candidate_index: Tensor
    counts: Tensor
    reason: Tensor
    suppressed_by: Tensor
    suppressor_iou: Tensor
    exhausted: Tensor
    floor: float
    k: int
    score_thresh: float
    iou_thresh: float
    max_detections: int
    embeddings: Tensor | None = None
    entropy: Tensor | None = None
    margin: Tensor | None = None
    energy: Tensor | None = None
    score_dtype: str = "float32"

    _TENSORS: ClassVar[tuple[str, ...]] = (
        "boxes",
        "scores",
        "labels",
        "logits",
        "candidate_index",
        "counts",
        "reason",
        "suppressed_by",
        "suppressor_iou",
        "exhausted",
        "embeddings",
        "entropy",
        "margin",
        "energy",
    )

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor field that is set, by name."""
        return {k: getattr(self, k) for k in self._TENSORS if getattr(self, k) is not None}

    def map_tensors(self, fn) -> NearMissBatch:
        """A copy with ``fn`` applied to every tensor field (e.g. a copy to the host)."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})


@dataclass
class DetectionBatch:
    """The detections of a batch, padded to ``D`` per image: what the hot path produces.

    Padding keeps every shape fixed, so building it needs no host
    synchronisation; :meth:`unbind` cuts it into :class:`DetectionOutput` per
    image (off the inference path: it reads ``counts``).

    Attributes:
        boxes: ``Tensor[B, D, 4]`` (:data:`BOX_FORMAT`) in original-image coordinates.
        scores: ``Tensor[B, D]``.
        labels: ``Tensor[B, D]`` int64, -1 in padding.
        logits: ``Tensor[B, D, C]``.
        candidate_index: ``Tensor[B, D]`` int64, -1 in padding.
        counts: ``Tensor[B]`` int64 detections per image.
        image_sizes: original ``(h, w)`` of each image.
        embeddings: ``Tensor[B, D, E]`` or None.
        entropy, margin, energy: ``Tensor[B, D]`` float32 uncertainty of each detection, or None
            (:func:`pyodlog.ops.detection_uncertainty`).
        near_misses: the batch's :class:`NearMissBatch`, or None (not logged).
        output_only: the model's returned boxes, scores and labels only, unparsed (a call
            sampled out with ``Sampling(sampled_out_aggregates="output")``): ``logits`` has no
            columns, ``candidate_index`` is -1, no embeddings nor uncertainty. A store
            summarises such a batch into the aggregates and never writes it as rows (an
            ``InMemorySink`` keeps the record as it is).
    """

    box_format: ClassVar[str] = BOX_FORMAT

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    logits: Tensor
    candidate_index: Tensor
    counts: Tensor
    image_sizes: list[tuple[int, int]]
    embeddings: Tensor | None = None
    entropy: Tensor | None = None
    margin: Tensor | None = None
    energy: Tensor | None = None
    near_misses: NearMissBatch | None = None
    output_only: bool = False

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def all_tensors(self) -> list[Tensor]:
        """Every tensor of the batch, its near-misses' included."""
        out = list(self.tensors().values())
        if self.near_misses is not None:
            out.extend(self.near_misses.tensors().values())
        return out

    def map_tensors(self, fn) -> DetectionBatch:
        """A copy with ``fn`` applied to every tensor (near-misses included), e.g. a copy to the host."""
        return dataclasses.replace(
            self,
            image_sizes=list(self.image_sizes),
            near_misses=None if self.near_misses is None else self.near_misses.map_tensors(fn),
            **{k: fn(v) for k, v in self.tensors().items()},
        )

    def tensors(self) -> dict[str, Tensor]:
        out = {
            "boxes": self.boxes,
            "scores": self.scores,
            "labels": self.labels,
            "logits": self.logits,
            "candidate_index": self.candidate_index,
            "counts": self.counts,
        }
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings
        for name in UNCERTAINTY_COLUMNS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to(self, device, non_blocking: bool = False) -> DetectionBatch:
        return self.map_tensors(lambda v: v.to(device, non_blocking=non_blocking))

    @classmethod
    def from_outputs(
        cls, outputs: list[DetectionOutput], image_sizes: list[tuple[int, int]] | None = None
    ) -> DetectionBatch:
        """Pads per-image :class:`DetectionOutput` into a batch (lengths from shapes: no host sync).

        Args:
            outputs: one per image, all on one device, with logits of one width
                and either all or none with embeddings.
            image_sizes: original ``(h, w)`` per image; default each output's ``image_size``.

        Raises:
            ValueError: the outputs do not fit together (logit widths, embeddings
                on some images only, devices).
        """
        if not outputs:
            raise ValueError("from_outputs needs at least one DetectionOutput")
        device = outputs[0].boxes.device
        if any(o.boxes.device != device for o in outputs):
            raise ValueError("every DetectionOutput of a batch must be on one device")
        widths = {tuple(o.logits.shape[1:]) for o in outputs}
        if len(widths) > 1:
            raise ValueError(
                f"the DetectionOutputs have logits of different widths {sorted(widths)}"
            )
        with_embeddings = {o.embeddings is not None for o in outputs}
        if len(with_embeddings) > 1:
            raise ValueError("either every DetectionOutput of a batch has embeddings or none has")

        def pad(name: str, value: float = 0) -> Tensor:
            return pad_sequence(
                [getattr(o, name) for o in outputs], batch_first=True, padding_value=value
            )

        lengths = torch.tensor([len(o) for o in outputs], dtype=torch.long)
        counts = (
            lengths.pin_memory().to(device, non_blocking=True)
            if device.type == "cuda"
            else lengths.to(device)
        )
        return cls(
            pad("boxes").reshape(len(outputs), -1, 4),
            pad("scores"),
            pad("labels", -1).to(torch.long),
            pad("logits"),
            pad("candidate_index", -1).to(torch.long),
            counts,
            list(image_sizes) if image_sizes is not None else [o.image_size for o in outputs],
            pad("embeddings") if with_embeddings == {True} else None,
        )

    def unbind(self) -> list[DetectionOutput]:
        """Per-image :class:`DetectionOutput` (reads ``counts``: a host sync on GPU)."""
        counts = self.counts.tolist()
        return [
            DetectionOutput(
                self.boxes[b, :n],
                self.scores[b, :n],
                self.labels[b, :n],
                self.logits[b, :n],
                self.candidate_index[b, :n],
                self.image_sizes[b],
                None if self.embeddings is None else self.embeddings[b, :n],
            )
            for b, n in enumerate(counts)
        ]


@dataclass
class CallRecord:
    """Everything one logged call produced, handed to a :class:`~pyodlog.monitoring.Sink`.

    Attributes:
        input_ids: one identifier per image.
        dataset_type: e.g. ``"deploying"``.
        n_epoch: the epoch tag (None: untagged).
        timestamp: seconds since the epoch (UTC), when the call started.
        image_sizes: original ``(h, w)`` per image (what boxes refer to).
        detections: the batch's detections.
        features: ``{alias: CompressedFeature}`` captured from ``target_layers``
            (nested outputs get ``alias/key`` names).
        fields: ``{name: list of one value per image}`` for ``additional_fields``.
        model_name, version_name, result_name: where the record belongs.
        thumbnails: what the images' JPEG thumbnails are made from, off the inference path
            (``log_images``; a :class:`pyodlog.io.thumbnails.ThumbnailSource`), or None.

        targets: the call's ground truth (``targets=``), or None: ``{"boxes": Tensor[M, 4]``
            float32 xyxy original-image pixels, ``"labels": Tensor[M]`` int64, ``"counts":
            list[int]`` boxes per image``}``, the images' boxes one after the other.
    """

    input_ids: list[str]
    dataset_type: str
    n_epoch: int | None
    timestamp: float
    image_sizes: list[tuple[int, int]]
    detections: DetectionBatch
    features: dict[str, CompressedFeature] = field(default_factory=dict)
    fields: dict[str, list[Any]] = field(default_factory=dict)
    model_name: str = ""
    version_name: str = ""
    result_name: str = ""
    thumbnails: Any = None
    targets: dict[str, Any] | None = None
    #: The logger's sampling policy (``pyodlog.Sampling``) or None: the store decides, off the
    #: inference path, whether the call's rows are written (its aggregates always are).
    sampling: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)


#: How a per-detection float column may be stored (see :class:`RecordStorage`).
STORAGE_PRECISIONS = ("float32", "float16", "bfloat16", "uint8")


@dataclass(frozen=True)
class RecordStorage:
    """How the per-detection ``logits`` and ``embeddings`` are stored (boxes and scores: float32 always).

    The default cuts a detection's bytes to 8-25 % of float32 storage (README: "Compact
    records"); the reader widens every column back to float32 transparently.

    Attributes:
        logits: ``"float16"`` (default; finite values beyond +-65504 are clamped to it),
            ``"bfloat16"``, ``"uint8"`` (per-row affine codes + float32 scale and offset, the
            feature quantisation of :func:`pyodlog.ops.compression.quantize_uint8`) or
            ``"float32"`` (exact).
        embeddings: the same choices; default ``"uint8"``.
        embedding_dim: project embeddings wider than this onto this many dimensions with a
            seeded random orthogonal projection (scaled by ``sqrt(E / k)`` so that lengths and
            distances are preserved in expectation); None keeps every dimension. Default 128.
        projection_seed: the projection's seed (stored in the schema: the same seed and widths
            give the same projection on every machine).
    """

    logits: str = "float16"
    embeddings: str = "uint8"
    embedding_dim: int | None = 128
    projection_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("logits", "embeddings"):
            value = getattr(self, name)
            if value not in STORAGE_PRECISIONS:
                raise ValueError(
                    f"RecordStorage({name}={value!r}): choose one of {STORAGE_PRECISIONS}"
                )
        dim = self.embedding_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(
                f"RecordStorage(embedding_dim={dim!r}) must be an int >= 1, or None to keep every dimension"
            )
        seed = self.projection_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(
                f"RecordStorage(projection_seed={seed!r}) must be an int in [0, 2**63)"
            )

    @classmethod
    def full(cls) -> RecordStorage:
        """float32 logits and embeddings, every dimension: the exact storage of segment formats 1 and 2."""
        return cls("float32", "float32", None, 0)

    @property
    def is_full(self) -> bool:
        return (
            self.logits == "float32" and self.embeddings == "float32" and self.embedding_dim is None
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits,
            "embeddings": self.embeddings,
            "embedding_dim": self.embedding_dim,
            "projection_seed": self.projection_seed,
            "projection": "orthogonal-gaussian-qr",
        }

    @classmethod
    def from_dict(cls, spec: Any) -> RecordStorage:
        """The storage a schema's ``"storage"`` entry describes (absent: :meth:`full`)."""
        if not isinstance(spec, dict):
            return cls.full()
        return cls(
            spec.get("logits", "float32"),
            spec.get("embeddings", "float32"),
            spec.get("embedding_dim"),
            int(spec.get("projection_seed", 0)),
        )

    def embedding_width(self, width: int) -> int:
        """How many values a stored embedding of a ``width``-wide one has."""
        return (
            width
            if self.embedding_dim is None or width <= self.embedding_dim
            else self.embedding_dim
        )
