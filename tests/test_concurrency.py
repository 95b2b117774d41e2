"""One logger shared by many threads, asyncio tasks and worker processes.

Every call's output is returned, every record is that call's own (compared by
input_id with what the call returned), a call that raised leaves no record,
and close(), wait_for_save(), export() and stats() are safe from any thread.
Real torchvision detectors (weights=None, small inputs so that 1,600 calls fit
in the suite), real HDF5 files, real processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.models import detection

import pyodlog
from pyodlog import LoggerClosedError, open_result
from pyodlog.io.copier import CopyStreams, DeviceCopier
from tests.helpers.outputs import distinct_init
from tests.helpers.readme_blocks import block_starting_with

THREADS, CALLS = 8, 200
SIZES = [(64, 64), (48, 80), (96, 72), (80, 56)]


def small_faster_rcnn() -> nn.Module:
    model = distinct_init(
        detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None,
            weights_backbone=None,
            min_size=64,
            max_size=96,
            rpn_pre_nms_top_n_test=150,
            rpn_post_nms_top_n_test=100,
            box_detections_per_img=30,
        )
    )
    with torch.no_grad():
        # Flatter class scores (a few detections per image above 0.002), and proposals
        # near their anchors (He-normal box deltas push every box off a 64 px image).
        for layer in (model.roi_heads.box_predictor.cls_score, model.rpn.head.bbox_pred):
            layer.weight.mul_(0.05)
            layer.bias.mul_(0.05)
    return model.eval()


def small_ssdlite() -> nn.Module:
    model = detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, topk_candidates=100, detections_per_img=30
    )
    model.transform.fixed_size, model.transform.min_size, model.transform.max_size = (
        (64, 64),
        (64,),
        64,
    )
    return distinct_init(model).eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"frcnn": small_faster_rcnn(), "ssd": small_ssdlite()}


@pytest.fixture
def one_intraop_thread():
    """Many Python threads each running the model: one intra-op thread each (what servers do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


THRESHOLDS = {"frcnn": 0.002, "ssd": 0.01}


def make_logger(models, name, result="r", **kwargs):
    # Every record is awaited here (the default drops and counts when the writer falls behind, which
    # a loaded CI machine could make happen): the test is about whose record is whose.
    kwargs.setdefault("sink", pyodlog.HDF5Store(config=pyodlog.WriterConfig(backpressure="block")))
    return pyodlog.create_logger(
        models[name], "m", name, result_name=result, score_thresh=THRESHOLDS[name], **kwargs
    )


def image(seed: int, size: tuple[int, int]) -> torch.Tensor:
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


class Boom(RuntimeError):
    """Raised inside the model for the calls the test chooses."""


def install_raiser(model: nn.Module, name: str):
    """A hook deep inside the model (after pyodlog's own hooks captured part of the call)
    that raises when the calling thread asked for it."""
    flag = threading.local()

    def maybe_raise(*_):
        if getattr(flag, "on", False):
            raise Boom("this call fails inside the model")

    module = model.roi_heads.box_predictor if name == "frcnn" else model.anchor_generator
    return flag, module.register_forward_pre_hook(maybe_raise)


def assert_same_detections(got: pyodlog.DetectionOutput | dict, want: dict, where: str) -> None:
    for key in ("boxes", "scores", "labels"):
        value = got[key] if isinstance(got, dict) else getattr(got, key)
        assert torch.equal(value, want[key]), f"{where}: logged {key} differ from the returned"


def call_inputs(t: int, k: int) -> tuple[str, list[str], list[torch.Tensor]]:
    """Thread t's call k: the family, the input ids and the images (1 or 2, mixed sizes)."""
    name = ("frcnn", "ssd")[(t + k) % 2]
    seeds = [(t * CALLS + k) * 2 + j for j in range(1 + (k % 3 == 0))]
    return name, [f"{name}-{s}" for s in seeds], [image(s, SIZES[(s + t) % 4]) for s in seeds]


def test_many_threads_share_one_logger_per_family_and_every_record_is_its_own_call(
    models, one_intraop_thread
):
    loggers = {name: make_logger(models, name) for name in models}
    raisers = {name: install_raiser(models[name], name) for name in models}
    returned: dict[str, dict] = {}  # input_id -> that image's returned output
    raised: set[str] = set()
    unexpected: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        start.wait()
        for k in range(CALLS):
            name, ids, imgs = call_inputs(t, k)
            flag = raisers[name][0]
            flag.on = k % 9 == 4
            try:
                with torch.inference_mode():
                    out = loggers[name](imgs, ids)
            except Boom:
                assert flag.on
                raised.update(ids)
                continue
            except BaseException as error:
                unexpected.append(error)
                return
            finally:
                flag.on = False
            assert len(out) == len(imgs)
            returned.update(zip(ids, out))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _, handle in raisers.values():
        handle.remove()
    assert not unexpected, unexpected[:3]

    total_images = sum(1 + (k % 3 == 0) for k in range(CALLS)) * THREADS
    assert len(returned) + len(raised) == total_images  # zero lost outputs
    assert raised and returned
    # The returned outputs are the model's: the same as the bare model's (a sample of calls),
    # while the loggers are open: close() gives the models their own thresholds back.
    with torch.inference_mode():
        for t, k in [(t, k) for t in range(THREADS) for k in range(CALLS)][::53]:
            name, ids, imgs = call_inputs(t, k)
            if ids[0] in returned:
                for input_id, bare in zip(ids, models[name](imgs)):
                    assert_same_detections(returned[input_id], bare, f"bare {input_id}")
    n_detections = 0
    for name, logger in loggers.items():
        logger.close()
        stats = logger.sink.stats()
        mine = [i for i in returned if i.startswith(name + "-")]
        assert stats["dropped"] == stats["queued"] == 0
        assert stats["written"] == stats["submitted"]
        result = open_result(logger.sink.directory)
        ids = result.images["input_id"]
        # Exactly one record per image of a call that returned; none for a call that raised.
        assert Counter(ids) == Counter(mine)
        for row, input_id in enumerate(ids):
            got = result.image_detections(row)
            n_detections += len(got.scores)
            assert_same_detections(got, returned[input_id], input_id)
    assert n_detections > 5000  # the comparison is not vacuous


def test_get_hooked_features_returns_the_calling_threads_own_capture(models):
    model = models["frcnn"]
    logger = make_logger(
        models, "frcnn", sink=pyodlog.InMemorySink(), target_layers={"box": "roi_heads.box_head"}
    )
    mine = threading.local()
    seen = model.roi_heads.box_head.register_forward_hook(
        lambda m, i, out: setattr(mine, "out", out)
    )
    a_called, b_called = threading.Event(), threading.Event()
    results = {}

    def thread_a():
        with torch.inference_mode():
            logger([image(1, (64, 64))])
        a_called.set()
        assert b_called.wait(60)  # thread B's call ran after A's
        results["a"] = (logger.get_hooked_features("box"), mine.out)

    def thread_b():
        assert a_called.wait(60)
        with torch.inference_mode():
            logger([image(2, (96, 72)), image(3, (64, 64))])
        results["b"] = (logger.get_hooked_features("box"), mine.out)
        b_called.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        seen.remove()
    for name in "ab":
        got, want = results[name]
        assert got is want  # this thread's own output of the layer, not the other's
    assert not torch.equal(results["a"][0], results["b"][0])
    with pytest.raises(KeyError, match="per thread"):
        logger.get_hooked_features("box")  # the main thread made no call
    logger.close()


def test_close_lets_calls_in_flight_finish_and_refuses_new_ones(models):
    logger = make_logger(models, "ssd")
    entered, proceed = threading.Event(), threading.Event()

    def hold(module, inputs):
        if threading.current_thread().name == "in-flight":
            entered.set()
            assert proceed.wait(60)

    hook = models["ssd"].head.register_forward_pre_hook(hold)
    outcome = {}

    def in_flight():
        with torch.inference_mode():
            outcome["out"] = logger([image(7, (64, 64))], ["in-flight"])

    caller = threading.Thread(target=in_flight, name="in-flight")
    closer = threading.Thread(target=logger.close)
    try:
        caller.start()
        assert entered.wait(60)  # the call is inside the model
        closer.start()
        waited = threading.Event()
        while not logger._closed:  # close() has begun (it refuses calls from now on)
            waited.wait(0.001)
        with pytest.raises(LoggerClosedError):
            logger([image(8, (64, 64))], ["after-close"])
        assert closer.is_alive()  # close() waits for the call in flight
        proceed.set()
        caller.join(60)
        closer.join(60)
    finally:
        proceed.set()
        hook.remove()
    assert not closer.is_alive() and len(outcome["out"]) == 1
    result = open_result(logger.sink.directory)
    assert result.images["input_id"] == ["in-flight"]
    assert_same_detections(result.image_detections(0), outcome["out"][0], "in-flight")
    # close() removed the logger's hooks once the call was done.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in models["ssd"].modules())


def test_wait_for_save_export_and_stats_from_another_thread_while_threads_log(
    models, tmp_path, one_intraop_thread
):
    logger = make_logger(models, "ssd")
    completed: list[str] = []
    lock = threading.Condition()
    stop = threading.Event()

    def worker(t):
        k = 0
        while not stop.is_set() or k < 10:
            input_id = f"t{t}-{k}"
            with torch.inference_mode():
                logger([image(t * 1000 + k, SIZES[k % 4])], [input_id])
            with lock:
                completed.append(input_id)
                lock.notify_all()
            k += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    try:
        for n in range(4):
            with lock:  # some more calls have returned since the last round
                assert lock.wait_for(lambda n=n: len(completed) >= 6 * (n + 1), 60)
                done_before = list(completed)
            logger.wait_for_save()
            stats = logger.sink.stats()
            assert stats["durable"] >= len(done_before)
            for _ in range(200):  # counters read while the threads log: always consistent
                stats = logger.sink.stats()
                assert stats["submitted"] == stats["written"] + stats["dropped"] + stats["queued"]
                assert stats["queued"] >= 0 and stats["durable"] <= stats["written"]
            with lock:
                done_before = list(completed)
            exported = open_result(logger.export(tmp_path / f"e{n}.zip"))
            # Every call that returned before export() began is in it, once.
            got = Counter(exported.images["input_id"])
            assert all(got[i] == 1 for i in done_before)
            assert max(got.values()) == 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    final = open_result(logger.export(tmp_path / "final.zip"))
    assert Counter(final.images["input_id"]) == Counter(completed)
    logger.close()
    stats = logger.sink.stats()
    assert stats["submitted"] == stats["written"] == len(completed)


def test_acall_runs_off_the_event_loop_and_returns_each_calls_output(models):
    logger = make_logger(models, "frcnn", target_layers={"box": "roi_heads.box_head"})
    model = models["frcnn"]
    loop_ran = threading.Event()

    def needs_the_loop(module, inputs):
        # Set by a coroutine: if acall blocked the event loop, this would time out.
        assert loop_ran.wait(60), "the event loop was blocked during the model call"

    hook = model.backbone.register_forward_pre_hook(needs_the_loop)
    last_box_head = {}
    seen = model.roi_heads.box_head.register_forward_hook(
        lambda m, i, out: last_box_head.update(out=out)
    )

    async def main():
        executor = ThreadPoolExecutor(4)
        try:
            calls = [
                logger.acall([image(s, SIZES[s % 4])], [f"a{s}"], executor=executor)
                for s in range(12)
            ]

            async def unblock():
                await asyncio.sleep(0)
                loop_ran.set()

            *outputs, _ = await asyncio.gather(*calls, unblock())
            # The awaiting thread sees what its awaited call captured.
            await logger.acall([image(99, (96, 72))], ["last"], executor=executor)
            box = logger.get_hooked_features("box")
            return outputs, box
        finally:
            executor.shutdown()

    try:
        outputs, box = asyncio.run(main())
    finally:
        hook.remove()
        seen.remove()
    # The calls ran under torch.inference_mode() in the workers (the default).
    assert all(out[0]["scores"].is_inference() for out in outputs)
    logger.close()
    result = open_result(logger.sink.directory)
    rows = {input_id: row for row, input_id in enumerate(result.images["input_id"])}
    assert sorted(rows) == sorted([f"a{s}" for s in range(12)] + ["last"])
    for s, out in enumerate(outputs):
        assert_same_detections(result.image_detections(rows[f"a{s}"]), out[0], f"a{s}")
    assert box is last_box_head["out"]  # the 'last' call ran alone: its capture is the latest


def test_the_readme_concurrency_example_runs(isolated_data_root):
    namespace: dict = {}
    exec(compile(block_starting_with("# concurrency"), "README.md:concurrency", "exec"), namespace)
    assert len(namespace["answers"]) == 4
    folder = isolated_data_root / "detector" / "v1" / "serving"
    assert sorted(open_result(folder).images["input_id"]) == list("abcde")


ROUNDS = 8


def _worker_process(home: str, k: int, start) -> None:
    import os

    os.environ["PYODLOG_HOME"] = home
    torch.set_num_threads(1)
    model = small_ssdlite()
    for r in range(ROUNDS):
        start.wait(60)  # the three open one new result at once, as workers starting together do
        logger = pyodlog.create_logger(
            model, "m", "ssd", result_name=f"served{r}", score_thresh=0.01
        )
        with torch.inference_mode():
            for i in range(2):
                logger([image(k * 100 + i, SIZES[(k + i) % 4])], [f"p{k}-{i}"])
        logger.close()


def test_three_worker_processes_log_into_one_result(isolated_data_root, tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    workers = [
        context.Process(target=_worker_process, args=(str(isolated_data_root), k, start))
        for k in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    want = Counter(f"p{k}-{i}" for k in range(3) for i in range(2))
    for r in range(ROUNDS):
        folder = isolated_data_root / "m" / "ssd" / f"served{r}"
        assert Counter(open_result(folder).images["input_id"]) == want, folder
        segments = sorted(folder.glob("*.h5"))
        assert len({s.name.split("-")[3] for s in segments}) == 3  # one writer (pid) per process
    # A logger opened afterwards on a result exports every process's records.
    with pyodlog.create_logger(
        small_ssdlite(), "m", "ssd", result_name="served0", n_epoch=None
    ) as logger:
        exported = open_result(logger.export(tmp_path))
    assert Counter(exported.images["input_id"]) == want


# -- the copier: each caller stream has its own copy stream ------------------------------


def fake_stream(stream_id: int, device_index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(device_type=1, device_index=device_index, stream_id=stream_id)


def test_copy_streams_give_each_caller_stream_its_own_side_stream():
    made = []
    streams = CopyStreams(new_stream=lambda device: made.append(device) or object(), max_streams=3)
    a, b = (
        streams.for_caller(fake_stream(1), "cuda:0"),
        streams.for_caller(fake_stream(2), "cuda:0"),
    )
    assert a is not b
    assert streams.for_caller(fake_stream(1), "cuda:0") is a  # one caller stream: one, in order
    c = streams.for_caller(fake_stream(1, device_index=1), "cuda:1")
    assert c is not a and made == ["cuda:0", "cuda:0", "cuda:1"]
    streams.for_caller(fake_stream(3), "cuda:0")  # a fourth: the least recently used goes
    assert len(streams) == 3 and streams.for_caller(fake_stream(1), "cuda:0") is a
    assert streams.for_caller(fake_stream(2), "cuda:0") is not b


def test_copy_streams_make_one_side_stream_per_caller_under_contention():
    streams = CopyStreams(new_stream=lambda device: object())
    start = threading.Barrier(8)
    got = [[] for _ in range(8)]

    def ask(t):
        start.wait()
        for i in range(200):
            got[t].append(streams.for_caller(fake_stream(i % 5), "cuda:0"))

    threads = [threading.Thread(target=ask, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(streams) == 5
    assert len({id(s) for per_thread in got for s in per_thread}) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_cuda_copies_wait_for_the_callers_own_stream():
    """Two threads compute on streams of their own; a slow kernel precedes each record's
    last write. Copies ordered after another stream (or the default one) would read early."""
    copier = DeviceCopier()
    errors = []

    def caller(value: float) -> None:
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                x = torch.zeros(1 << 20, device="cuda")
                torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream
                x.fill_(value)
                record = pyodlog.CallRecord(
                    ["id"],
                    "deploying",
                    None,
                    0.0,
                    [(1, 1)],
                    pyodlog.DetectionBatch(
                        x[:4].reshape(1, 1, 4),
                        x[:1].reshape(1, 1),
                        torch.zeros(1, 1, dtype=torch.long, device="cuda"),
                        x[:3].reshape(1, 1, 3),
                        torch.zeros(1, 1, dtype=torch.long, device="cuda"),
                        torch.ones(1, dtype=torch.long, device="cuda"),
                        [(1, 1)],
                    ),
                    {},
                    {},
                )
                pending = copier.to_host(record)
            host = pending.wait().detections.boxes
            assert not host.is_cuda and bool((host == value).all()), host
            copier.release(pending)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(float(v),)) for v in (3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(copier.streams) == 2 and copier.inflight_bytes == 0
