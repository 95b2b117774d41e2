"""The tables of a segment file and how a CallRecord becomes rows of them.

A segment holds three groups, each a set of equal-length columns:

* ``images``: one row per image — ``input_id``, ``dataset_type``, ``n_epoch``
  (-1: untagged), ``timestamp``, ``image_size`` (h, w), ``det_offset`` and
  ``det_count`` into ``detections``, and one ``fields/<name>`` column per
  additional field; ``thumbnail`` (ragged bytes: one JPEG per image, no
  bytes for an image without one) when the logger has ``log_images``.
* ``detections``: one row per detection — ``boxes`` [4], ``scores``,
  ``labels``, ``candidate_index``, ``logits`` [C], ``embeddings`` [E].
  Boxes, scores, logits and embeddings are always stored as float32, whatever
  the model computed in: float16 and bfloat16 values (autocast, ``.half()``
  models) widen to float32 exactly; float64 values are rounded to float32.
* ``targets`` (only when a call passed ``targets=``): one row per ground-truth
  box — ``boxes`` [4] float32 xyxy original-image pixels, ``labels`` int64;
  images then have ``gt_offset`` and ``gt_count`` into it, and ``gt_logged``
  (int8: 1 when the call passed targets, 0 for images logged without targets in
  the same segment, whose ``gt_count`` is 0).
* ``features``: one row per (image, captured tensor) — ``image_row``,
  ``name``, ``method``, ``dtype``, ``shape`` [8] / ``original_shape`` [8]
  (-1 padded; without the batch axis when ``per_image``), ``per_image``
  (the image's slice of a batch tensor), ``pooled_to`` [2], ``payload_offset``/``payload_nbytes`` into the
  flat byte column ``features_payload``, and ``qrow_offset``/``qrow_count``
  into ``features_scale``/``features_offset`` (uint8 quantisation). A payload
  keeps the dtype compression gave it; a ``bfloat16`` payload is stored as its
  16-bit pattern with ``payload_dtype`` ``"bfloat16"`` (lossless).

* ``near_misses`` (segment format 3, when the logger logs them): one row per
  near-miss — the columns of ``detections`` plus ``reason`` (uint8: 1
  below_score, 2 suppressed, 3 over_cap), ``suppressed_by`` (int64, the
  suppressing detection's row within its image's detections, -1 if none) and
  ``suppressor_iou`` (float32, NaN if none); images then have ``nm_offset``,
  ``nm_count`` and the replay envelope (``nm_floor``, ``nm_k``,
  ``nm_exhausted``, ``nm_score_thresh``, ``nm_iou_thresh``,
  ``nm_max_detections``; format 5: ``nm_score_dtype``, see :data:`SCORE_DTYPES`). Detections (and near-misses) may carry float32
  ``entropy``, ``margin`` and ``energy``.

Optional columns (uncertainty, embeddings, near-misses and their envelope, ground truth,
``sample_weight``, thumbnails) may be logged by some calls of a segment and not others (two
loggers on one result, or calls with and without ``targets=``): every column of a group still has
one row per row of the group, the rows of calls that did not log it filled as :data:`NOT_LOGGED`
says (NaN floats, ``nm_k`` -1, ``gt_count`` 0, weight 1, no thumbnail bytes) — what the reader
gives for segments written without the column, so the format is unchanged.

Strings are stored as ragged bytes: a flat ``<name>.bytes`` uint8 column and a
``<name>.spans`` int64 [2] column (offset, length): SWMR appends need
fixed-size types. Strings are stored losslessly: UTF-8 with ``surrogateescape``
(:func:`encode_str` / :func:`decode_str`), so a str made from undecodable bytes
(``os.fsdecode(b"\\xff")``, what ``os.listdir`` gives for a non-UTF-8 file
name) reads back as the same str.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pyodlog.io.thumbnails import encode_thumbnails
from pyodlog.ops.compression import METHODS, compact_rows
from pyodlog.structures import UNCERTAINTY_COLUMNS, CallRecord, NearMissBatch, RecordStorage

__all__ = [
    "MAX_DIMS",
    "SCORE_DTYPES",
    "SCORE_DTYPE_CODES",
    "ColumnBatch",
    "ColumnsDiffer",
    "decode_str",
    "encode_str",
    "record_to_columns",
]

MAX_DIMS = 8
#: ``images/nm_score_dtype`` (segment format 5): the dtype the model compared its scores with the
#: thresholds in, by code. 0: float32 (or not logged: a segment of format 4 or older; a float64
#: model's scores are stored as float32 and replayed so).
SCORE_DTYPES = {0: "float32", 1: "float16", 2: "bfloat16"}
SCORE_DTYPE_CODES = {name: code for code, name in SCORE_DTYPES.items()}
FIELD_NUMPY = {
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float64": np.float64,
    "bool": np.bool_,
}


STR_ENCODING = "utf-8"
STR_ERRORS = "surrogateescape"


def encode_str(text: str) -> bytes:
    """The bytes a string column stores: UTF-8, lone surrogates U+DC80..U+DCFF as the bytes they escape.

    Lossless for every str that ``os.fsdecode`` (or any ``surrogateescape``
    decode) can produce; :func:`decode_str` gives the same str back.

    Raises:
        UnicodeEncodeError: another lone surrogate (e.g. ``"\\ud800"``), which
            no byte string represents.
    """
    return text.encode(STR_ENCODING, STR_ERRORS)


def decode_str(data: bytes) -> str:
    """The inverse of :func:`encode_str` (bytes that are not UTF-8 come back as lone surrogates)."""
    return data.decode(STR_ENCODING, STR_ERRORS)


@dataclass
class ColumnBatch:
    """Rows for each column, accumulated over several records, ready to append.

    Numeric columns collect arrays whose first axis is rows; string columns
    collect lists of str. :meth:`finish` concatenates them.
    """

    numeric: dict[str, list[np.ndarray]] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)
    payload: list[np.ndarray] = field(default_factory=list)  # uint8 pieces of features_payload
    n_images: int = 0
    n_detections: int = 0
    n_features: int = 0
    n_qrows: int = 0
    payload_bytes: int = 0
    n_records: int = 0
    n_near_misses: int = 0

    #: Rows of each numeric column so far (kept by :meth:`rows`; what :func:`record_to_columns`
    #: aligns optional columns by).
    row_counts: dict[str, int] = field(default_factory=dict)

    def rows(self, name: str, value: np.ndarray) -> None:
        self.numeric.setdefault(name, []).append(value)
        self.row_counts[name] = self.row_counts.get(name, 0) + len(value)

    def text(self, name: str, values: list[str]) -> None:
        self.strings.setdefault(name, []).extend(values)

    def blobs(self, name: str, values: list[bytes]) -> None:
        """A ragged bytes column (``images/thumbnail``): stored like a string column, never decoded."""
        column: list[Any] = self.strings.setdefault(name, [])
        column.extend(values)

    def mark(self) -> tuple:
        """The batch's current extent, for :meth:`rollback`."""
        return (
            {k: len(v) for k, v in self.numeric.items()},
            {k: len(v) for k, v in self.strings.items()},
            len(self.payload),
            (self.n_images, self.n_detections, self.n_features, self.n_qrows),
            (self.payload_bytes, self.n_records),
            self.n_near_misses,
            dict(self.row_counts),
        )

    def rollback(self, mark: tuple) -> None:
        """Forgets every row added after :meth:`mark` (a record that failed half-way leaves no rows)."""
        numeric, strings, payload, counts, (payload_bytes, n_records), n_near_misses, rows = mark
        self.row_counts = dict(rows)
        for table, lengths in ((self.numeric, numeric), (self.strings, strings)):
            for name in list(table):
                if name in lengths:
                    del table[name][lengths[name] :]
                else:
                    del table[name]
        del self.payload[payload:]
        self.n_images, self.n_detections, self.n_features, self.n_qrows = counts
        self.payload_bytes, self.n_records = payload_bytes, n_records
        self.n_near_misses = n_near_misses

    @property
    def nbytes(self) -> int:
        return self.payload_bytes + sum(
            a.nbytes for arrays in self.numeric.values() for a in arrays
        )

    def finish(self) -> tuple[dict[str, list[np.ndarray]], dict[str, list[str]], list[np.ndarray]]:
        """Each column as a list of pieces to write in order.

        Small pieces are concatenated (one write instead of many); large ones
        (a record's logits, a feature payload) stay separate so that they are
        written without an extra copy.
        """
        numeric = {k: _coalesce(v) for k, v in self.numeric.items()}
        return numeric, self.strings, _coalesce(self.payload) if self.payload else []


# Pieces at least this large are written one by one rather than concatenated.
LARGE_PIECE = 256 << 10


def _coalesce(pieces: list[np.ndarray]) -> list[np.ndarray]:
    if len(pieces) <= 1 or sum(p.nbytes for p in pieces) >= LARGE_PIECE * len(pieces):
        return pieces
    return [np.concatenate(pieces)]


def _pad(shape, fill=-1) -> np.ndarray:
    out = np.full(MAX_DIMS, fill, dtype=np.int64)
    out[: len(shape)] = shape
    return out


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array; ``bfloat16`` (which numpy lacks) widened to float32, losslessly."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy()


def _host_payload(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A feature payload as a numpy array and the dtype name stored for it.

    ``bfloat16`` is stored as its 16-bit pattern (``uint16`` bytes, payload dtype
    ``"bfloat16"``): lossless, half the size of float32, and read back bit for bit.
    """
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16"
    values = t.numpy()
    return values, str(values.dtype)


def record_to_columns(
    record: CallRecord,
    batch: ColumnBatch,
    storage: RecordStorage | None = None,
    sample_weight: float | None = None,
) -> None:
    """Appends one record's rows to ``batch`` (vectorised per record: no loop over detections).

    Cross-table offsets (``det_offset``, ``image_row``, ``payload_offset``,
    ``qrow_offset``) count from the start of the batch; the segment writer
    shifts them by where the batch lands in the file.

    All or nothing: a record that cannot become rows (e.g. a str that
    :func:`encode_str` refuses) raises and leaves ``batch`` as it was.

    ``storage`` (None: float32) gives the precision of ``logits`` and ``embeddings``
    (:class:`~pyodlog.structures.RecordStorage`; a uint8 column gets ``<name>_scale`` and
    ``<name>_offset`` columns); ``sample_weight`` (None: no column) is the images'
    ``sample_weight``, the inverse of the probability that sampling kept the call.
    """
    mark = batch.mark()
    try:
        _record_rows(record, batch, storage)
        if sample_weight is not None:
            batch.rows("images/sample_weight", np.full(len(record), sample_weight, np.float32))
        _align_optional_columns(batch, mark)
    except BaseException:
        batch.rollback(mark)
        raise


def _check_strings(name: str, values: list[str]) -> None:
    """Every string of a column is encodable (one encode per column and record)."""
    try:
        encode_str("".join(values))
    except UnicodeEncodeError as error:
        bad = next(v for v in values if not _encodable(v))
        raise ValueError(
            f"{name} holds {bad!r}, which has no byte representation ({error.reason})"
        ) from error
    except TypeError as error:
        raise ValueError(f"{name} must hold strings, got {values[:3]!r}") from error


def _encodable(text: str) -> bool:
    try:
        encode_str(text)
    except (UnicodeEncodeError, TypeError):
        return False
    return True


def _thumbnail_rows(record: CallRecord, batch: ColumnBatch, n: int) -> None:
    """The ``images/thumbnail`` rows of a record: JPEG-encoded here, on the writer thread.

    A batch mixing records with and without thumbnails (two loggers on one result) stays
    rectangular: images without one get no bytes.
    """
    has_column = "images/thumbnail" in batch.strings
    if record.thumbnails is None:
        if has_column:
            batch.blobs("images/thumbnail", [b""] * n)
        return
    if not has_column and batch.n_images:
        batch.blobs("images/thumbnail", [b""] * batch.n_images)
    batch.blobs("images/thumbnail", encode_thumbnails(record.thumbnails, n))


def _compact_detection_rows(
    batch: ColumnBatch, det, storage: RecordStorage, valid, full, group: str = "detections"
) -> None:
    """``logits`` and ``embeddings`` of ``group`` (``detections`` or ``near_misses``: the same
    precision, so that a replay mixes them alike) in the storage's precision (:func:`compact_rows`)."""
    n, d = det.boxes.shape[0], det.boxes.shape[1]
    index = None if full else torch.from_numpy(np.flatnonzero(valid.reshape(-1)))
    for name, tensor, precision, project in (
        ("logits", det.logits, storage.logits, None),
        ("embeddings", det.embeddings, storage.embeddings, storage.embedding_dim),
    ):
        if tensor is None:
            continue
        rows = tensor.detach().cpu().reshape(n * d, tensor.shape[-1])
        if index is not None:
            rows = rows.index_select(0, index)
        values, scale, offset = compact_rows(rows, precision, project, storage.projection_seed)
        if values.dtype == torch.int16:  # bfloat16, stored as its 16-bit pattern
            array = values.numpy().view(np.uint16)
        else:
            array = values.numpy()
        batch.rows(f"{group}/{name}", array)
        if scale is not None and offset is not None:
            batch.rows(f"{group}/{name}_scale", scale.numpy())
            batch.rows(f"{group}/{name}_offset", offset.numpy())


def _record_rows(
    record: CallRecord, batch: ColumnBatch, storage: RecordStorage | None = None
) -> None:
    det = record.detections
    n = len(record)
    counts = _host(det.counts).astype(np.int64)
    d = det.boxes.shape[1]
    valid = np.arange(d)[None, :] < counts[:, None]
    batch.rows(
        "images/det_offset",
        batch.n_detections + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
    )
    batch.rows("images/det_count", counts)
    batch.rows(
        "images/n_epoch",
        np.full(n, -1 if record.n_epoch is None else int(record.n_epoch), np.int64),
    )
    batch.rows("images/timestamp", np.full(n, float(record.timestamp), np.float64))
    batch.rows("images/image_size", np.asarray(record.image_sizes, dtype=np.int32).reshape(n, 2))
    input_ids = list(record.input_ids)
    _check_strings("input_id", input_ids)
    _check_strings("dataset_type", [record.dataset_type])
    batch.text("images/input_id", input_ids)
    batch.text("images/dataset_type", [record.dataset_type] * n)
    for name, values in record.fields.items():
        if isinstance(values, torch.Tensor):
            values = (values.expand(n) if values.dim() == 0 else values).tolist()
        if values and isinstance(values[0], str):
            _check_strings(f"field {name!r}", list(values))
            batch.text(f"images/fields/{name}", list(values))
        else:
            batch.rows(f"images/fields/{name}", np.asarray(values))
    _thumbnail_rows(record, batch, n)
    # Every image at its quota (the common case under load): the padded rows are all valid, and a
    # reshape is a view, where boolean indexing would copy every logit and embedding once more.
    full = bool(n) and int(counts.min()) == d

    def detection_rows(t: torch.Tensor, dtype) -> np.ndarray:
        values = _host(t)
        rows = values.reshape(n * d, *values.shape[2:]) if full else values[valid]
        return rows.astype(dtype, copy=False)

    batch.rows("detections/boxes", detection_rows(det.boxes, np.float32))
    batch.rows("detections/scores", detection_rows(det.scores, np.float32))
    batch.rows("detections/labels", detection_rows(det.labels, np.int64))
    batch.rows("detections/candidate_index", detection_rows(det.candidate_index, np.int64))
    if storage is None or storage.is_full:
        batch.rows("detections/logits", detection_rows(det.logits, np.float32))
        if det.embeddings is not None:
            batch.rows("detections/embeddings", detection_rows(det.embeddings, np.float32))
    else:
        _compact_detection_rows(batch, det, storage, valid, full)
    _target_rows(record, batch, n)
    for name in UNCERTAINTY_COLUMNS:
        if getattr(det, name) is not None:
            batch.rows(f"detections/{name}", detection_rows(getattr(det, name), np.float32))
    if det.near_misses is not None:
        _near_miss_rows(det.near_misses, n, batch, storage)

    for name, feature in record.features.items():
        payload, payload_dtype = _host_payload(feature.payload)
        per_image = payload.ndim >= 1 and payload.shape[0] == n
        pieces = n if per_image else 1
        piece_shape = payload.shape[1:] if per_image else payload.shape
        raw = np.ascontiguousarray(payload).view(np.uint8).reshape(pieces, -1)
        piece_bytes = raw.shape[1]
        qrows = 0
        if feature.method == "uint8":
            if feature.scale is None or feature.offset is None:
                raise ValueError(f"feature {name!r} is uint8 without its scale and offset")
            scale, offset = _host(feature.scale), _host(feature.offset)
            qrows = len(scale) // pieces
            batch.rows("features_scale", scale)
            batch.rows("features_offset", offset)
        batch.payload.append(raw.reshape(-1))
        image_rows = batch.n_images + (np.arange(n) if per_image else np.zeros(1, np.int64))
        batch.rows("features/image_row", image_rows.astype(np.int64))
        batch.text("features/name", [name] * pieces)
        batch.text("features/dtype", [str(feature.dtype).replace("torch.", "")] * pieces)
        batch.text("features/payload_dtype", [payload_dtype] * pieces)
        batch.rows("features/method", np.full(pieces, METHODS.index(feature.method), np.int8))
        batch.rows("features/per_image", np.full(pieces, 1 if per_image else 0, np.int8))
        batch.rows("features/shape", np.tile(_pad(piece_shape), (pieces, 1)))
        original = feature.original_shape[1:] if per_image else feature.original_shape
        batch.rows("features/original_shape", np.tile(_pad(original), (pieces, 1)))
        batch.rows(
            "features/pooled_to",
            np.tile(np.asarray(feature.pooled_to or (-1, -1), np.int64), (pieces, 1)),
        )
        batch.rows(
            "features/payload_offset",
            batch.payload_bytes + np.arange(pieces, dtype=np.int64) * piece_bytes,
        )
        batch.rows("features/payload_nbytes", np.full(pieces, piece_bytes, np.int64))
        batch.rows(
            "features/qrow_offset", batch.n_qrows + np.arange(pieces, dtype=np.int64) * qrows
        )
        batch.rows("features/qrow_count", np.full(pieces, qrows, np.int64))
        batch.payload_bytes += raw.size
        batch.n_qrows += qrows * pieces
        batch.n_features += pieces
    batch.n_images += n
    batch.n_detections += int(counts.sum())
    batch.n_records += 1


def _target_rows(record: CallRecord, batch: ColumnBatch, n: int) -> None:
    """The ground truth of a call (``targets=``): ``targets/*`` rows and images ``gt_offset``/``gt_count``.

    A call without targets adds none: in a batch where other calls have them, its images get
    ``gt_count`` 0 and ``gt_logged`` 0 (:data:`NOT_LOGGED`, by :func:`_align_optional_columns`),
    so every image column has every row.
    """
    targets = record.targets
    if targets is None:
        return
    base = _group_rows(batch, "targets")
    counts = np.asarray(targets["counts"], np.int64)
    if len(counts) != n:
        raise ValueError(f"targets has {len(counts)} entries for {n} images")
    batch.rows(
        "images/gt_offset", base + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    )
    batch.rows("images/gt_count", counts)
    # 1: the call passed targets (an image without objects has gt_count 0 too), 0: it did not.
    batch.rows("images/gt_logged", np.ones(n, np.int8))
    boxes = _host(targets["boxes"]).astype(np.float32).reshape(-1, 4)
    labels = _host(targets["labels"]).astype(np.int64).reshape(-1)
    if len(boxes) != int(counts.sum()) or len(labels) != len(boxes):
        raise ValueError(
            f"targets hold {len(boxes)} boxes and {len(labels)} labels, their counts say {int(counts.sum())}"
        )
    batch.rows("targets/boxes", boxes)
    batch.rows("targets/labels", labels)


def _near_miss_rows(
    nm: NearMissBatch, n: int, batch: ColumnBatch, storage: RecordStorage | None = None
) -> None:
    """The ``near_misses`` rows of a record and its images' ``nm_*`` columns (the envelope).

    Images get ``nm_offset``/``nm_count`` into ``near_misses`` and the envelope of their call:
    ``nm_floor``, ``nm_k``, ``nm_exhausted`` and the thresholds the detections were made with
    (``nm_score_thresh``, ``nm_iou_thresh``, ``nm_max_detections``).
    """
    counts = _host(nm.counts).astype(np.int64)
    k = nm.boxes.shape[1]
    valid = np.arange(k)[None, :] < counts[:, None]
    batch.rows(
        "images/nm_offset",
        batch.n_near_misses + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
    )
    batch.rows("images/nm_count", counts)
    batch.rows("images/nm_exhausted", _host(nm.exhausted).astype(np.int8).reshape(n))
    batch.rows("images/nm_floor", np.full(n, float(nm.floor), np.float64))
    batch.rows("images/nm_k", np.full(n, int(nm.k), np.int64))
    batch.rows("images/nm_score_thresh", np.full(n, float(nm.score_thresh), np.float64))
    batch.rows("images/nm_iou_thresh", np.full(n, float(nm.iou_thresh), np.float64))
    batch.rows("images/nm_max_detections", np.full(n, int(nm.max_detections), np.int64))
    code = SCORE_DTYPE_CODES.get(getattr(nm, "score_dtype", "float32"), 0)
    batch.rows("images/nm_score_dtype", np.full(n, code, np.uint8))

    def rows(t: torch.Tensor, dtype) -> np.ndarray:
        return _host(t)[valid].astype(dtype, copy=False)

    compact = storage is not None and not storage.is_full
    for name, dtype in NEAR_MISS_COLUMNS.items():
        value = getattr(nm, name)
        if value is not None and not (compact and name in ("logits", "embeddings")):
            batch.rows(f"near_misses/{name}", rows(value, dtype))
    if compact:
        assert storage is not None
        _compact_detection_rows(batch, nm, storage, valid, False, group="near_misses")
    batch.n_near_misses += int(counts.sum())


#: The columns of the ``near_misses`` group and their stored dtypes.
NEAR_MISS_COLUMNS = {
    "boxes": np.float32,
    "scores": np.float32,
    "labels": np.int64,
    "candidate_index": np.int64,
    "logits": np.float32,
    "embeddings": np.float32,
    "entropy": np.float32,
    "margin": np.float32,
    "energy": np.float32,
    "reason": np.uint8,
    "suppressed_by": np.int64,
    "suppressor_iou": np.float32,
}


# -- optional columns: what a row that did not log one gets -----------------------------------


class ColumnsDiffer(ValueError):
    """A record's rows of a column have another dtype or row shape than its batch's (e.g.
    embeddings of another width): it needs a batch (and a segment) of its own."""


#: The value a row gets in an optional column that its call did not log, when other rows of the
#: same segment (or result) have that column: one table for the writer (records of one batch or
#: segment logged with different options, e.g. two loggers on one result) and the reader
#: (segments written with different options). Floats not logged are NaN (uncertainty,
#: embeddings: a NaN row; the near-miss envelope's floor and thresholds); the near-miss envelope
#: says none was logged (``nm_count`` 0, ``nm_k`` -1, ``nm_max_detections`` -1); ground truth:
#: none (``gt_count`` 0, ``gt_logged`` 0); ``sample_weight`` 1 (kept for sure). ``RUNNING``:
#: an offset into another group, which continues that group's rows (zero rows of its own).
RUNNING = "running"
NOT_LOGGED: dict[str, Any] = {
    "images/sample_weight": 1.0,
    "images/nm_offset": RUNNING,
    "images/nm_count": 0,
    "images/nm_exhausted": 0,
    "images/nm_floor": np.nan,
    "images/nm_k": -1,
    "images/nm_score_thresh": np.nan,
    "images/nm_iou_thresh": np.nan,
    "images/nm_max_detections": -1,
    "images/nm_score_dtype": 0,
    "images/gt_offset": RUNNING,
    "images/gt_count": 0,
    "images/gt_logged": 0,
    **{
        f"{group}/{name}": np.nan
        for group in ("detections", "near_misses")
        for name in (*UNCERTAINTY_COLUMNS, "embeddings", "embeddings_scale", "embeddings_offset")
    },
}
#: What a running offset column counts rows of.
RUNNING_OVER = {"images/nm_offset": "near_misses", "images/gt_offset": "targets"}
#: Ragged bytes columns and what an image without a value gets.
NOT_LOGGED_BLOBS: dict[str, bytes] = {"images/thumbnail": b""}
#: bfloat16 NaN as the 16-bit pattern a compact bfloat16 column stores.
_BF16_NAN = np.uint16(0x7FC0)


def not_logged_rows(name: str, n: int, dtype: Any, row_shape: tuple, start: int = 0) -> np.ndarray:
    """``n`` rows of column ``name`` (dtype, row shape) for rows that did not log it (:data:`NOT_LOGGED`).

    ``start``: for a running offset column, the rows its group had before these (each row
    continues there with zero rows of its own). Compact columns: a float16 or float32 column
    gets NaN, a bfloat16 one (its uint16 pattern) NaN's pattern, uint8 codes 0 (their NaN
    ``_scale``/``_offset`` make them NaN when widened).

    Raises:
        KeyError: ``name`` is not optional (its rows cannot be made up).
    """
    value = NOT_LOGGED[name]
    dtype = np.dtype(dtype)
    if value is RUNNING:
        value = start
    elif isinstance(value, float) and np.isnan(value):
        if dtype == np.uint16:
            value = _BF16_NAN
        elif dtype.kind != "f":
            value = 0
    return np.full((n, *row_shape), value, dtype)


def _group_rows(batch: ColumnBatch, group: str) -> int:
    """Rows of a group of the batch so far (``targets``: by its labels)."""
    if group == "images":
        return batch.n_images
    if group == "detections":
        return batch.n_detections
    if group == "near_misses":
        return batch.n_near_misses
    if group == "targets":  # from the pieces: a batch may be built without rows() (tests)
        return sum(len(piece) for piece in batch.numeric.get("targets/labels", ()))
    raise KeyError(group)


_ALIGNED_GROUPS = ("images", "detections", "near_misses")


def _align_optional_columns(batch: ColumnBatch, mark: tuple) -> None:
    """After a record's rows: every image, detection and near-miss column has one row per row of
    its group again.

    A batch mixes records logged with different options (two loggers, or calls with and without
    uncertainty, embeddings, near-misses, targets): an optional column that this record did not
    log gets :func:`not_logged_rows` for its rows, and one that it is the first to log gets them
    for the batch's earlier rows (put in front). Without this the batch's columns would
    disagree and its segment would be read as damaged.

    Raises:
        ValueError: a column that is not optional lacks rows; :class:`ColumnsDiffer`: the
            record's rows of a column have another dtype or row shape than the batch's (the
            caller rolls the record back).
    """
    pieces_before, before_counts, n_nm_before, rows_before = mark[0], mark[3], mark[5], mark[6]
    before = {  # see ColumnBatch.mark
        "images": before_counts[0],
        "detections": before_counts[1],
        "near_misses": n_nm_before,
    }
    after = {
        "images": batch.n_images,
        "detections": batch.n_detections,
        "near_misses": batch.n_near_misses,
    }
    row_counts = batch.row_counts
    for name, pieces in batch.numeric.items():  # lists change below, never the dict
        group = _GROUP_OF.get(name, "")
        if group == "":
            head = name.split("/", 1)[0]
            group = _GROUP_OF[name] = head if head in after else None
        if group is None:
            continue
        have, had = row_counts[name], rows_before.get(name)
        first = pieces[0]
        if had is not None:  # the record's pieces join the batch's: one dtype and row shape
            for piece in pieces[max(1, pieces_before.get(name, 0)) :]:
                if piece.dtype != first.dtype or piece.shape[1:] != first.shape[1:]:
                    raise ColumnsDiffer(
                        f"{name} rows of {piece.dtype} {piece.shape[1:]} cannot join the batch's "
                        f"{first.dtype} {first.shape[1:]}: the calls logged it differently"
                    )
        if have == after[group]:
            continue
        if name not in NOT_LOGGED:
            raise ValueError(
                f"{name} has {have} rows for {after[group]} {group}: only optional columns "
                f"({sorted(NOT_LOGGED)}) may be left out by a call"
            )
        running = RUNNING_OVER.get(name)
        if had is None:  # first logged by this record: the batch's earlier rows had none
            fill = not_logged_rows(name, before[group], first.dtype, first.shape[1:])
            pieces.insert(0, fill)
        else:  # this record did not log it
            start = _group_rows(batch, running) if running else 0
            fill = not_logged_rows(name, after[group] - have, first.dtype, first.shape[1:], start)
            pieces.append(fill)
        row_counts[name] = have + len(fill)
        if row_counts[name] != after[group]:
            raise ValueError(
                f"{name} has {have} rows of {after[group] - before[group]} new {group}: the call "
                f"logged it for part of its rows only"
            )


# Each column name's group among _ALIGNED_GROUPS (None: another group), found once.
_GROUP_OF: dict[str, str | None] = {}


def pad_to_columns(
    batch: ColumnBatch,
    numeric: dict[str, list[np.ndarray]],
    strings: dict[str, list[Any]],
    columns: dict[str, tuple[np.dtype, tuple]],
    string_columns: list[str],
) -> None:
    """Adds to ``numeric``/``strings`` (what ``batch.finish()`` gave) the segment's ``columns``
    the batch lacks, as not-logged rows (:data:`NOT_LOGGED`): a group the batch has no rows of
    (features, targets, near-misses) gets none.

    Raises:
        KeyError: a missing column is not optional (check with :func:`missing_fillable` first).
    """
    for name, (dtype, row_shape) in columns.items():
        if name in numeric or "/" not in name:
            continue
        group = name.split("/", 1)[0]
        n = batch.n_features if group == "features" else _group_rows(batch, group)
        if n == 0:
            continue
        running = RUNNING_OVER.get(name)
        start = _group_rows(batch, running) if running else 0
        numeric[name] = [not_logged_rows(name, n, dtype, row_shape, start)]
    for name in string_columns:
        if name not in strings:
            strings[name] = [NOT_LOGGED_BLOBS[name]] * batch.n_images


def missing_fillable(batch: ColumnBatch, columns: set[str], string_columns: set[str]) -> bool:
    """Whether the columns of a segment (``columns``, ``string_columns``) that the batch lacks
    can be filled for its rows (:func:`pad_to_columns`)."""
    for name in columns.difference(batch.numeric):
        if "/" not in name:
            continue
        group = name.split("/", 1)[0]
        n = batch.n_features if group == "features" else _group_rows(batch, group)
        if n and name not in NOT_LOGGED:
            return False
    return all(
        name in NOT_LOGGED_BLOBS or not batch.n_images
        for name in string_columns.difference(batch.strings)
    )
