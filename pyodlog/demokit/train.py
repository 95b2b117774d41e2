"""Trains the demo detector on generated scenes (the script behind ``demo_detector.pt``), and loads it.

:func:`load_detector` gives the shipped weights, or trains and caches a quick
replacement when they are missing.


The committed weights were made by::

    python -m pyodlog.demokit.train --iterations 1500 --threads 1 --out pyodlog/demokit/demo_detector.pt

(about 17 minutes on one core of a busy two-core machine); then :data:`pyodlog.demokit.detector.WEIGHTS_SHA256`
was set to the SHA-256 it prints. Training scenes are ``val``-domain scenes with
seeds from :data:`pyodlog.demokit.scenes.TRAIN_SEED_BASE` on, never the seeds the
demo and the tests evaluate on. Seeded: the same arguments give the same weights
on the same machine and torch build.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN

from pyodlog.demokit import detector
from pyodlog.demokit.detector import (
    WEIGHTS_SHA256,
    average_precision_50,
    build_detector,
    match_counts,
    read_weights,
    save_weights,
)
from pyodlog.demokit.scenes import CLASS_NAMES, TRAIN_SEED_BASE, make_scene, make_scenes


def evaluate(model: FasterRCNN, count: int = 64, domain_name: str = "val") -> dict[str, float]:
    """AP50, and precision and recall at score 0.5 / IoU 0.5, on ``count`` scenes with seeds 0.."""
    scenes = make_scenes(count, domain_name)
    was_training = model.training
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, count, 16):
            outputs += model([s.image for s in scenes[start : start + 16]])
    model.train(was_training)
    targets = [s.target for s in scenes]
    tp, n_det, n_gt = match_counts(outputs, targets)
    return {
        "ap50": round(average_precision_50(outputs, targets, len(CLASS_NAMES)), 4),
        "precision": round(tp / max(n_det, 1), 4),
        "recall": round(tp / max(n_gt, 1), 4),
    }


def train(
    iterations: int | None = None,
    *,
    time_budget_s: float | None = None,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    verbose: bool = True,
    checkpoint: Callable[[FasterRCNN, int], None] | None = None,
    checkpoint_every: int = 50,
) -> FasterRCNN:
    """A trained demo detector (eval mode).

    Either a fixed number of ``iterations`` or about ``time_budget_s`` seconds (the
    number of iterations is then set from the speed of the first few). AdamW, a short
    linear warm-up then cosine decay to zero. ``checkpoint(model, step)`` is called
    every ``checkpoint_every`` steps (the model in training mode).
    """
    if (iterations is None) == (time_budget_s is None):
        raise ValueError("pass exactly one of iterations or time_budget_s")
    torch.manual_seed(seed)
    model = build_detector()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = 50
    total = iterations if iterations is not None else 10**9
    start = time.perf_counter()
    step = 0
    warm_at = 0.0
    next_seed = TRAIN_SEED_BASE + seed * 10_000_000
    while step < total:
        if time_budget_s is not None and step in (10, 40):
            # the first steps are slower (allocator, caches): estimate again once warm
            elapsed = time.perf_counter() - start
            per_step = elapsed / 10 if step == 10 else (elapsed - warm_at) / 30
            warm_at = elapsed
            total = max(step + 10, step + int((time_budget_s - elapsed) / per_step))
        scenes = [make_scene(next_seed + i, "val") for i in range(batch_size)]
        next_seed += batch_size
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        losses = model([s.image for s in scenes], [s.target for s in scenes])
        loss = torch.stack(list(losses.values())).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if checkpoint is not None and step % checkpoint_every == 0 and step < total:
            checkpoint(model, step)
        if verbose and (step % 25 == 0 or step == total):
            parts = " ".join(
                f"{k.removeprefix('loss_')} {float(v.detach()):.3f}" for k, v in losses.items()
            )
            print(
                f"step {step}/{total} loss {float(loss.detach()):.3f} ({parts}) "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    return model.eval()


def cache_path() -> Path:
    """Where a retrained detector is cached: ``$PYODLOG_DEMO_CACHE`` or ``~/.cache/pyodlog``."""
    folder = os.environ.get("PYODLOG_DEMO_CACHE") or Path.home() / ".cache" / "pyodlog"
    return Path(folder) / "demo_detector_quick.pt"


def load_detector(
    *, retrain_seconds: float = 100.0, verbose: bool = True
) -> tuple[FasterRCNN, str]:
    """The trained demo detector, eval mode, and where its weights came from.

    The committed weights when present (SHA-256 checked); otherwise a cached quick
    retrain (checked against its ``.sha256``); otherwise trains one now for about
    ``retrain_seconds`` and caches it.

    Raises:
        WeightsError: a weights file exists but fails its checksum.
    """
    if detector.WEIGHTS_PATH.exists():
        return read_weights(detector.WEIGHTS_PATH, WEIGHTS_SHA256), str(detector.WEIGHTS_PATH)
    cached = cache_path()
    sidecar = Path(str(cached) + ".sha256")
    if cached.exists() and sidecar.exists():
        return read_weights(cached, sidecar.read_text().strip()), str(cached)
    from pyodlog.demokit.train import (
        train,
    )  # only when needed: training code is not loaded otherwise

    if verbose:
        print(
            f"the demo detector's weights {detector.WEIGHTS_PATH} are missing: training a smaller schedule "
            f"(~{retrain_seconds:.0f} s; a weaker detector than the shipped one), cached in {cached}; "
            "`git checkout -- pyodlog/demokit/demo_detector.pt` restores the shipped weights"
        )
    model = train(time_budget_s=retrain_seconds, verbose=verbose)
    sha = save_weights(model, cached, {"schedule": "quick", "seconds": retrain_seconds})
    return read_weights(cached, sha), str(cached)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", required=True, help="where to write the weights (.pt)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    def checkpoint(model: FasterRCNN, step: int) -> None:
        save_weights(model, args.out + ".partial-checkpoint", {"step": step})

    model = train(
        args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint=checkpoint,
    )
    seconds = time.perf_counter() - started
    metrics = {d: evaluate(model, 64, d) for d in ("val", "deploying")}
    info = {
        "schedule": f"{args.iterations} iterations of batch {args.batch_size}, AdamW lr {args.lr}",
        "seed": args.seed,
        "seconds": round(seconds),
        "torch": str(torch.__version__),
        "metrics_64_scenes": metrics,
    }
    sha = save_weights(model, args.out, info)
    print(f"trained in {seconds:.0f} s; {metrics}")
    print(f"wrote {args.out}, SHA-256 {sha}")


if __name__ == "__main__":
    main()
