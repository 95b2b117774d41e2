"""Bare vs logged vs sampled-out calls, paired (issue 22: a sampled-out call costs a few percent of
a logged one).

One call of each variant per rotation (order alternating), as benchmarks/overhead_paired.py:
bare ``model(images)``; a logged call (every call written, default settings: near-misses,
uncertainty, embeddings); a sampled-out call (``Sampling(1e-9)``: its draw fails before the
model runs, so it records only what the always-on aggregates need, and on the CPU its parse is
deferred to the store's writer thread, pyodlog.monitoring.deferred); and the same sampled-out
call parsed on the call path (``defer_sampled_out = False``: what a sampled-out call cost
before). Since deferall (issue 17) a logged call on the CPU is parsed on the writer thread too;
``logged, parsed on call`` (``defer_parse = False``) is a logged call as before. The writer
threads run beside, as in production. Printed:

1. per variant the median call time, and the sampled-out overhead over bare against the logged
   call's (the model's noise hides most of it);
2. the logger's own work on the call path after the model answered (``_record_of_call`` and the
   submit, timed around them in the same calls: wall, and the calling thread's CPU time): what
   a serving thread waits for beyond the model;
3. the deferred calls' parse on the writer thread (its CPU time there, per call: logged and
   sampled out);
4. the machine's CPU per call (``time.process_time``, every thread of the process: the model,
   the call's logging, the writer's summary, parse, rows and appends) over a block of calls of
   each variant followed by ``wait_for_save``.

Usage: python -m benchmarks.overhead_sampling MODEL BATCH ROTATIONS [CLOCK]
  CLOCK: wall (default) or thread (the calling thread's CPU time, one intra-op thread; see
  benchmarks/overhead_paired.py).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import torch

import pyodlog
from benchmarks.environment import print_header
from benchmarks.overhead_paired import CLOCKS, setup
from pyodlog.demokit.timing import paired_rotation
from pyodlog.io import HDF5Store


def main(name: str, batch: int, rotations: int, clock: str = "wall") -> None:
    model, images, folder = setup(name, batch, clock)
    logged = pyodlog.create_logger(model, "b", "logged", sink=HDF5Store(folder / "a"))
    sampled = pyodlog.create_logger(
        model, "b", "sampled", sink=HDF5Store(folder / "b"), sampling=pyodlog.Sampling(1e-9)
    )
    inline = pyodlog.create_logger(
        model, "b", "inline", sink=HDF5Store(folder / "c"), sampling=pyodlog.Sampling(1e-9)
    )
    inline.defer_sampled_out = False  # the sampled-out call parsed on its path (as before)
    logged_inline = pyodlog.create_logger(model, "b", "logged-inline", sink=HDF5Store(folder / "d"))
    logged_inline.defer_parse = False  # a logged call parsed on its path (before deferall)
    loggers = {
        "logged": logged,
        "logged, parsed on call": logged_inline,
        "sampled out": sampled,
        "sampled, parsed on call": inline,
    }
    variants = {"bare": model, **loggers}
    own: dict[str, list[tuple[float, float]]] = {key: [] for key in loggers}
    for key, logger in loggers.items():
        for method in ("_record_of_call", "_submit_or_count"):
            setattr(logger, method, _timed(getattr(logger, method), own[key]))
    # thread CPU seconds of each parse off the calling thread, per deferring logger
    writer_parse: dict[str, list[float]] = {"logged": [], "sampled out": []}
    for key, spent_parsing in writer_parse.items():
        loggers[key]._parse_model_output = _parse_timed(
            loggers[key]._parse_model_output, spent_parsing
        )
    with torch.inference_mode():
        timed = paired_rotation(
            {key: (lambda call=call: call(images)) for key, call in variants.items()},
            rotations,
            warmup=1,
            clock=CLOCKS[clock],
        )
    for logger in loggers.values():
        logger.wait_for_save()
    print(
        f"{name}, batch {batch}, {rotations} rotations (order alternating), clock {clock} "
        f"({torch.get_num_threads()} intra-op threads)"
    )
    bare = timed.median("bare")
    for key in variants:
        median = timed.median(key)
        print(
            f"{key:24s} median {median * 1e3:9.2f} ms  overhead {(median - bare) * 1e3:7.2f} ms  "
            f"paired {timed.ratio(key, 'bare')}"
        )
    over = {k: [r - 1 for r in timed.ratios(k, "bare")] for k in loggers}
    med = {k: sorted(v)[len(v) // 2] for k, v in over.items()}
    print(
        "overhead over bare (medians of the paired ratios - 1): "
        + ", ".join(f"{k} {v:+.4f}" for k, v in med.items())
    )
    per_call = {}
    for key, spent in own.items():
        # _record_of_call and its submit, in pairs (wall, thread CPU) per call
        calls = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(spent[0::2], spent[1::2])]
        wall = statistics.median(c[0] for c in calls)
        cpu = statistics.median(c[1] for c in calls)
        per_call[key] = (wall, cpu)
        print(
            f"{key:24s} the logger's own work on the call path: median {wall * 1e3:.3f} ms wall, "
            f"{cpu * 1e3:.3f} ms thread CPU per call ({len(calls)} calls)"
        )
    for key in ("sampled out", "sampled, parsed on call"):
        print(
            f"call path, {key} / logged: {per_call[key][0] / per_call['logged'][0]:.3f} (wall), "
            f"{per_call[key][1] / per_call['logged'][1]:.3f} (thread CPU)"
        )
    print(
        f"call path, logged / logged parsed on call: "
        f"{per_call['logged'][0] / per_call['logged, parsed on call'][0]:.3f} (wall), "
        f"{per_call['logged'][1] / per_call['logged, parsed on call'][1]:.3f} (thread CPU)"
    )
    for key, spent_parsing in writer_parse.items():
        if spent_parsing:
            print(
                f"{key}: parse on the writer thread, median "
                f"{statistics.median(spent_parsing) * 1e3:.3f} ms thread CPU per call "
                f"({len(spent_parsing)} calls)"
            )
    print(
        f"written {logged.stats()['written']} calls; sampled out {sampled.stats()['sampled_out']} "
        f"(written {sampled.stats()['written']}), parsed on call {inline.stats()['sampled_out']}"
    )
    # The machine's CPU per call: a block of calls of each variant, its writer's work included.
    block = max(2, rotations)
    with torch.inference_mode():
        for key, call in variants.items():
            t0 = time.process_time()
            for _ in range(block):
                call(images)
            if key in loggers:
                loggers[key].wait_for_save()
            spent = (time.process_time() - t0) / block
            print(
                f"{key:24s} process CPU per call, writer included: {spent * 1e3:9.2f} ms ({block} calls)"
            )
    for logger in loggers.values():
        logger.close()


def _parse_timed(parse, spent: list[float]):
    """``parse`` adding its thread CPU time to ``spent`` when it runs off the calling thread."""

    def run(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return parse(*args, **kwargs)
        finally:
            if threading.current_thread() is not threading.main_thread():
                spent.append(time.thread_time() - t0)

    return run


def _timed(method, spent: list[tuple[float, float]]):
    """``method`` adding its (wall, thread CPU) time to ``spent`` at each call (``clock`` independent)."""

    def run(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent.append((time.perf_counter() - t0, time.thread_time() - c0))

    return run


if __name__ == "__main__":
    print_header("benchmarks.overhead_sampling")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
