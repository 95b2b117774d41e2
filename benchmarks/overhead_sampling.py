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
  benchmarks/overhead_paired.py); ``cpu``: the total CPU per call each logger adds over the bare
  model, call path + its store's threads (:func:`cpu_main`); ``profile``: cProfile of the writer
  thread's parse of ROTATIONS sampled-out calls (:func:`profile_main`).
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


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """Every live thread but the calling one: ident -> (name, its CPU seconds so far)."""
    out = {}
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            out[thread.ident] = (thread.name, time.clock_gettime(clock))
        except (OSError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return out


def loggers_thread_cpu(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], loggers: dict
) -> tuple[dict[str, float], float]:
    """The CPU seconds each logger's threads (named after its result folder: its store's writer,
    summary helper, retention) spent between two :func:`_thread_cpu` snapshots, and what the
    threads of no logger spent."""
    folders = {key: logger.sink.directory.name for key, logger in loggers.items()}
    threads = dict.fromkeys(loggers, 0.0)
    unattributed = 0.0
    for ident, (thread, cpu) in after.items():
        spent = cpu - before.get(ident, (thread, 0.0))[1]
        owner = [key for key, folder_name in folders.items() if folder_name in thread]
        if owner:
            threads[owner[0]] += spent
        else:
            unattributed += spent
    return threads, unattributed


def cpu_main(name: str, batch: int, rotations: int) -> None:
    """Total CPU per call a logger adds over the bare model, logged vs sampled out (sampled), and
    sampled out with ``Sampling(sampled_out_aggregates="output")`` (its output not parsed).

    One intra-op thread, so the model and the call path run on the calling thread. Per call:

    * **call path**: the calling thread's CPU time of the logger's call (``time.thread_time``)
      minus that of the model's forward inside it (a pre-hook and a hook on the model's root
      module, the same for bare calls): the logger's own work before and after the model
      (sampling draw, captures, record, submit);
    * **other threads**: the CPU time (``pthread_getcpuclockid``) of every thread whose name holds
      the logger's result folder (its store's writer and summary helper, retention), summed over
      the whole run (every rotation, then the final ``wait_for_save``: its last flush included)
      and divided by the calls made.

    Calls in paired rotations (bare, logged, sampled out; order alternating). The writer threads
    run beside, as in production (no barrier per call: a barrier flushes and fsyncs).
    Added CPU = median call path + other threads per call; the ratio printed is
    (sampled out - bare) / (logged - bare) of that added CPU.
    """
    model, images, folder = setup(name, batch, "thread")
    logged = pyodlog.create_logger(model, "b", "logged", sink=HDF5Store(folder / "a"))
    sampled = pyodlog.create_logger(
        model, "b", "sampled", sink=HDF5Store(folder / "b"), sampling=pyodlog.Sampling(1e-9)
    )
    output_only = pyodlog.create_logger(
        model,
        "b",
        "output",
        sink=HDF5Store(folder / "e"),
        sampling=pyodlog.Sampling(1e-9, sampled_out_aggregates="output"),
    )
    loggers = {"logged": logged, "sampled out": sampled, "output only": output_only}
    variants = {"bare": model, **loggers}
    forward: list[float] = []
    model.register_forward_pre_hook(lambda *_: forward.append(time.thread_time()))
    model.register_forward_hook(lambda *_: forward.append(time.thread_time() - forward.pop()))
    call_path: dict[str, list[float]] = {key: [] for key in variants}
    model_cpu: dict[str, list[float]] = {key: [] for key in variants}

    def run(key: str) -> None:
        t0 = time.thread_time()
        variants[key](images)
        spent = time.thread_time() - t0
        inner = forward.pop()
        call_path[key].append(spent - inner)
        model_cpu[key].append(inner)

    keys = list(variants)
    with torch.inference_mode():
        for key in keys:  # warm-up
            run(key)
        for logger in loggers.values():
            logger.wait_for_save()
        for values in (*call_path.values(), *model_cpu.values()):
            values.clear()
        before = _thread_cpu()
        for i in range(rotations):
            for key in keys if i % 2 == 0 else keys[::-1]:
                run(key)
        for logger in loggers.values():
            logger.wait_for_save()
        after = _thread_cpu()
    threads, unattributed = loggers_thread_cpu(before, after, loggers)
    threads["bare"] = 0.0
    print(
        f"{name}, batch {batch}, {rotations} rotations (order alternating), CPU per call, "
        f"{torch.get_num_threads()} intra-op thread(s)"
    )
    added = {}
    for key in variants:
        path = statistics.median(call_path[key])
        other = threads[key] / rotations
        added[key] = path + other
        print(
            f"{key:12s} model forward median {statistics.median(model_cpu[key]) * 1e3:9.2f} ms  "
            f"call path {path * 1e3:7.3f} ms  other threads {other * 1e3:7.3f} ms  "
            f"added {added[key] * 1e3:7.3f} ms"
        )
    print(f"threads of no logger: {unattributed * 1e3:.1f} ms over the run")
    ratio = (added["sampled out"] - added["bare"]) / (added["logged"] - added["bare"])
    print(f"(sampled out - bare) / (logged - bare), added CPU per call: {ratio:.4f}")
    ratio = (added["output only"] - added["bare"]) / (added["logged"] - added["bare"])
    print(
        '(sampled out, sampled_out_aggregates="output" - bare) / (logged - bare), added CPU per '
        f"call: {ratio:.4f}"
    )
    print(
        f"written {logged.stats()['written']} calls; sampled out {sampled.stats()['sampled_out']}"
    )
    for logger in loggers.values():
        logger.close()


def profile_main(name: str, batch: int, calls: int) -> None:
    """cProfile (and thread CPU time) of the writer thread's parse of sampled-out calls."""
    import cProfile
    import io
    import pstats

    model, images, folder = setup(name, batch, "thread")
    sampled = pyodlog.create_logger(
        model, "b", "sampled", sink=HDF5Store(folder / "b"), sampling=pyodlog.Sampling(1e-9)
    )
    profiler = cProfile.Profile()
    spent: list[float] = []
    parse = sampled._parse_model_output

    def run(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            return parse(*args, **kwargs)
        t0 = time.thread_time()
        profiler.enable()
        try:
            return parse(*args, **kwargs)
        finally:
            profiler.disable()
            spent.append(time.thread_time() - t0)

    with torch.inference_mode():
        sampled(images)  # warm-up, not profiled
        sampled.wait_for_save()
        sampled._parse_model_output = run
        for _ in range(calls):
            sampled(images)
            sampled.wait_for_save()
    print(
        f"{name}, batch {batch}: writer-thread parse of a sampled-out call, thread CPU "
        f"(profiler off: see the thread_time of the 'cpu' mode; with it on) median "
        f"{statistics.median(spent) * 1e3:.3f} ms over {len(spent)} calls"
    )
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    print(text.getvalue())
    sampled.close()


if __name__ == "__main__":
    print_header("benchmarks.overhead_sampling")
    mode = sys.argv[4] if len(sys.argv) > 4 else "wall"
    if mode == "cpu":
        cpu_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "profile":
        profile_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), mode)
