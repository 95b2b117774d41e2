"""Sampling: which calls' rows are written, and with which weight.

``create_logger(..., sampling=0.01)`` or ``sampling=pyodlog.Sampling(...)``. The images' draw
is made on the call path before the model runs (:meth:`Sampling.before_call`: a hash of the
input ids, host strings only, no host sync); the rest of the decision off the inference path:
the store's writer thread summarises every call (its aggregates count 100 % of the calls,
:mod:`pyodlog.io.aggregates`) and asks the call's :class:`CallDecision` whether to write the
call's rows. A call that nothing can keep any more once its draw failed (no output-dependent
rule: near-misses not logged or not kept, no ``keep_uncertain``, no ``watch_classes``) is
*sampled out before the model runs*: the logger then does only what the aggregates need (the
detections, their logits and embeddings), without near-misses, ``target_layers`` features or
thumbnails, and on the CPU leaves even that parse to the store's writer thread
(:mod:`pyodlog.monitoring.deferred`).

A call is always kept when its ``dataset_type`` is not ``"deploying"`` (default on: known
before the call, it costs nothing), and, when asked, when it holds a near-miss, a detection
whose uncertainty passes a threshold, or a detection of a watched class; otherwise each of its
images is drawn at ``rate`` (from a hash of its ``input_id`` when ``deterministic``, so reruns
draw the same images whatever the batching) and the call is kept when one of them is.

The default is the rate alone (``sampling=0.01`` is ``Sampling(0.01)``: 1 % of the deploying
calls; ``keep_near_misses`` is opt-in). With near-misses logged (``near_miss=32``, the
default) nearly every call of a real detector holds one (the duplicates NMS suppressed, the
candidates just under the threshold), so a near-miss rule on by default kept nearly every call
and sampled nothing out; and a rule that looks at the output keeps every call undecided until
its output is known, so none is sampled out before its model runs (the cheap path). A kept call's images carry
``sample_weight`` = 1 / the probability that the call was kept (1 for an always-kept call),
so weighted counts and means over the kept rows are unbiased (Horvitz-Thompson).
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["CallDecision", "Sampling", "check_sampling"]

_UNCERTAINTY = ("entropy", "margin")
#: ``Sampling(sampled_out_aggregates=...)``: what a sampled-out call adds to the aggregates.
SAMPLED_OUT_AGGREGATES = ("all", "output")


class Sampling:
    """A sampling policy for :func:`pyodlog.create_logger` (``sampling=``).

    Args:
        rate: the probability that an image is drawn, in (0, 1] (1: keep every call).
        keep_near_misses: always keep a call that holds a near-miss (when near-misses are
            logged; otherwise this never triggers). Default False: with ``near_miss=32`` (the
            logger's default) nearly every call of a real detector holds a near-miss, so this
            keeps nearly every call; use it with a small ``near_miss`` and a ``near_miss_floor``
            close to the score threshold, or on a model whose near-misses are rare.
        keep_uncertain: ``{"entropy": e}`` keeps a call with a detection whose normalised
            entropy (entropy of its class probabilities / ln C, in [0, 1]) is ``>= e``;
            ``{"margin": m}`` one whose top-1 minus top-2 class probability is ``<= m``;
            both may be given. None: off. Computed from the logits when the record holds no
            uncertainty columns.
        watch_classes: always keep a call with a detection of one of these labels.
        keep_other_dataset_types: always keep calls whose ``dataset_type`` is not
            ``"deploying"`` (train, val, test, ...).
        deterministic: draw each image from a hash of ``(seed, input_id)`` (reruns keep the
            same images); False: a pseudo-random draw seeded by ``seed``.
        seed: the hash's (or generator's) seed.
        sampled_out_aggregates: what a call sampled out before its model ran adds to the
            always-on aggregates. ``"all"`` (default): everything, as a kept call (its output is
            parsed: each detection matched to its candidate for its logits and embedding), so the
            entropy and margin histograms and the embedding sketch count every call; it costs
            0.3-0.7 of a logged call's CPU. ``"output"``: only what the model returned (calls,
            images, detections, the score, box-size and detections-per-image histograms: every
            call, exactly); its output is not parsed, so the entropy and margin histograms and
            the embedding sketch count the kept calls only; it costs 0.05-0.16 of a logged
            call's CPU (README "What a sampled-out call costs"). (A family whose output the
            logger cannot read without its parse, e.g. DETR or a custom one, parses as with
            ``"all"``.)

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self,
        rate: float = 0.01,
        *,
        keep_near_misses: bool = False,
        keep_uncertain: Mapping[str, float] | None = None,
        watch_classes: Iterable[int] = (),
        keep_other_dataset_types: bool = True,
        deterministic: bool = True,
        seed: int = 0,
        sampled_out_aggregates: str = "all",
    ) -> None:
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float, np.floating, np.integer))
            or not 0.0 < float(rate) <= 1.0
        ):
            raise ValueError(
                f"Sampling(rate={rate!r}): the rate must be a number in (0, 1], e.g. 0.01 to keep 1 % "
                "of the images (1.0 keeps every call)"
            )
        for name, value in (
            ("keep_near_misses", keep_near_misses),
            ("keep_other_dataset_types", keep_other_dataset_types),
            ("deterministic", deterministic),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"Sampling({name}={value!r}) must be True or False")
        thresholds: dict[str, float] = {}
        if keep_uncertain is not None:
            if not isinstance(keep_uncertain, Mapping) or not keep_uncertain:
                raise ValueError(
                    f"Sampling(keep_uncertain={keep_uncertain!r}) must be a dict like {{'entropy': 0.5}} "
                    "or {'margin': 0.1} (or None)"
                )
            for key, threshold in keep_uncertain.items():
                if key not in _UNCERTAINTY:
                    raise ValueError(
                        f"Sampling(keep_uncertain=...) has {key!r}: use 'entropy' (normalised, keep when "
                        ">= the value) and/or 'margin' (keep when <= the value)"
                    )
                if (
                    isinstance(threshold, bool)
                    or not isinstance(threshold, (int, float, np.floating, np.integer))
                    or not 0.0 <= float(threshold) <= 1.0
                ):
                    raise ValueError(
                        f"Sampling(keep_uncertain={{{key!r}: {threshold!r}}}): the threshold must be in [0, 1]"
                    )
                thresholds[key] = float(threshold)
        if isinstance(watch_classes, (str, bytes)) or not isinstance(watch_classes, Iterable):
            raise ValueError(
                f"Sampling(watch_classes={watch_classes!r}) must be a list of class labels (ints)"
            )
        watched = list(watch_classes)
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in watched):
            raise ValueError(
                f"Sampling(watch_classes={watched!r}) must hold class labels (ints), as in detections['labels']"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Sampling(seed={seed!r}) must be an int")
        if sampled_out_aggregates not in SAMPLED_OUT_AGGREGATES:
            raise ValueError(
                f"Sampling(sampled_out_aggregates={sampled_out_aggregates!r}) must be 'all' (a "
                "sampled-out call's output is parsed: its uncertainty and embeddings are counted "
                "too) or 'output' (only what the model returned is counted: a few percent of a "
                "logged call's cost)"
            )
        self.rate = float(rate)
        self.keep_near_misses = keep_near_misses
        self.keep_uncertain = thresholds
        self.watch_classes = tuple(sorted({int(c) for c in watched}))
        self.keep_other_dataset_types = keep_other_dataset_types
        self.deterministic = deterministic
        self.seed = seed
        self.sampled_out_aggregates = sampled_out_aggregates
        self._watched = np.asarray(self.watch_classes, np.int64)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._salt = seed.to_bytes(16, "little", signed=True)

    def __repr__(self) -> str:
        return (
            f"Sampling(rate={self.rate}, keep_near_misses={self.keep_near_misses}, "
            f"keep_uncertain={self.keep_uncertain or None}, watch_classes={list(self.watch_classes)}, "
            f"keep_other_dataset_types={self.keep_other_dataset_types}, "
            f"deterministic={self.deterministic}, seed={self.seed}, "
            f"sampled_out_aggregates={self.sampled_out_aggregates!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (a quarantined record carries its policy): the lock is made anew.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("sampled_out_aggregates", "all")  # pickled before it existed
        self._lock = threading.Lock()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "keep_near_misses": self.keep_near_misses,
            "keep_uncertain": dict(self.keep_uncertain),
            "watch_classes": list(self.watch_classes),
            "keep_other_dataset_types": self.keep_other_dataset_types,
            "deterministic": self.deterministic,
            "seed": self.seed,
            "sampled_out_aggregates": self.sampled_out_aggregates,
        }

    # -- the decision (the writer thread) ----------------------------------------------------

    def always_keeps(self, summary: Any) -> str | None:
        """Why a call is kept whatever the draw (``"dataset_type"``, ``"near_miss"``,
        ``"uncertain"``, ``"watched_class"``), or None."""
        if self.keep_other_dataset_types and summary.dataset_type != "deploying":
            return "dataset_type"
        if self.keep_near_misses and summary.has_near_miss:
            return "near_miss"
        if "entropy" in self.keep_uncertain and bool(
            np.any(summary.entropy >= self.keep_uncertain["entropy"])
        ):
            return "uncertain"
        if "margin" in self.keep_uncertain and bool(
            np.any(summary.margin <= self.keep_uncertain["margin"])
        ):
            return "uncertain"
        if len(self._watched) and bool(np.isin(summary.labels, self._watched).any()):
            return "watched_class"
        return None

    def draw(self, input_id: str) -> float:
        """The image's draw in [0, 1): kept at ``rate`` when the draw is below it."""
        if self.deterministic:
            digest = hashlib.blake2b(
                input_id.encode("utf-8", "surrogateescape"), digest_size=8, key=self._salt
            ).digest()
            return int.from_bytes(digest, "little") / 2.0**64
        with self._lock:
            return self._random.random()

    def decide(self, summary: Any, input_ids: list[str]) -> float | None:
        """The weight of a kept call (1 / its probability of being kept), or None to sample it out."""
        if self.rate >= 1.0 or self.always_keeps(summary) is not None:
            return 1.0
        if self.drawn(input_ids):
            return self.drawn_weight(len(input_ids))
        return None

    def drawn(self, input_ids: list[str]) -> bool:
        """Whether one of the call's images is drawn (kept at ``rate``)."""
        return any(self.draw(i) < self.rate for i in input_ids)

    def drawn_weight(self, n_images: int) -> float:
        """The weight of a call kept by its draw alone: 1 / P(one of its ``n_images`` is drawn)."""
        return 1.0 / (1.0 - (1.0 - self.rate) ** n_images)

    def output_can_keep(self, near_misses_logged: bool) -> bool:
        """Whether a rule that looks at the model's output (near-misses, uncertainty, watched
        classes) can keep a call; ``near_misses_logged``: the logger logs near-misses."""
        return bool(
            (self.keep_near_misses and near_misses_logged)
            or self.keep_uncertain
            or len(self._watched)
        )

    def before_call(
        self, dataset_type: str, input_ids: list[str], near_misses_logged: bool
    ) -> CallDecision:
        """The call's decision as far as it is known before the model runs (the draw made now,
        once: the writer does not draw again). Host values only: no device access."""
        if self.rate >= 1.0 or (self.keep_other_dataset_types and dataset_type != "deploying"):
            return CallDecision(self, drawn=True, sampled_out=False)
        drawn = self.drawn(input_ids)
        out = not drawn and not self.output_can_keep(near_misses_logged)
        return CallDecision(self, drawn=drawn, sampled_out=out)


class CallDecision:
    """One call's sampling decision, its draw made on the call path (:meth:`Sampling.before_call`).

    What a record carries as ``sampling``: the writer asks :meth:`decide` with the call's
    summary, as it asks a :class:`Sampling`; the answer is the policy's, with this call's draw.

    Attributes:
        policy: the :class:`Sampling` policy.
        drawn: one of the call's images was drawn (or the call is kept whatever its output).
        sampled_out: known before the model ran: nothing can keep the call (the logger then
            records only what the aggregates need).
    """

    __slots__ = ("drawn", "policy", "sampled_out")

    def __init__(self, policy: Sampling, *, drawn: bool, sampled_out: bool) -> None:
        self.policy = policy
        self.drawn = drawn
        self.sampled_out = sampled_out

    def __getstate__(self) -> dict[str, Any]:
        return {"policy": self.policy, "drawn": self.drawn, "sampled_out": self.sampled_out}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"CallDecision({self.policy!r}, drawn={self.drawn}, sampled_out={self.sampled_out})"

    @property
    def rate(self) -> float:
        return self.policy.rate

    @property
    def output_only(self) -> bool:
        """Sampled out before the model ran, with aggregates of the model's output only (its
        output is not parsed: ``Sampling(sampled_out_aggregates="output")``)."""
        return self.sampled_out and self.policy.sampled_out_aggregates == "output"

    def to_dict(self) -> dict[str, Any]:
        return self.policy.to_dict()

    def decide(self, summary: Any, input_ids: list[str]) -> float | None:
        """As :meth:`Sampling.decide`, with this call's draw (made once, before the model ran)."""
        if self.sampled_out:
            return None
        policy = self.policy
        if policy.rate >= 1.0 or policy.always_keeps(summary) is not None:
            return 1.0
        if self.drawn:
            return policy.drawn_weight(len(input_ids))
        return None


def check_sampling(value: Any) -> Sampling | None:
    """``sampling=`` of ``create_logger``: None (every call), a rate in (0, 1] (``Sampling(rate)``:
    the rate alone, other dataset types than ``"deploying"`` kept), or a :class:`Sampling`."""
    if value is None or isinstance(value, Sampling):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(
            f"sampling must be None (log every call), a rate in (0, 1] such as 0.01, or a "
            f"pyodlog.Sampling(...) policy; got {type(value).__name__} {value!r}"
        )
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"sampling={value!r}: a rate must be in (0, 1], e.g. 0.01 keeps 1 % of the images"
        )
    return Sampling(float(value))
