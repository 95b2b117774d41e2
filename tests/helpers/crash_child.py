"""A process that logs continuously until it is killed (tests/test_storage.py, benchmarks/soak_crash.py).

Prints ``SUBMITTED <images>`` before each call and ``ACKED <images>`` after each
``wait_for_save`` returns, flushing stdout, so the parent knows what was
acknowledged when it sends SIGKILL.
Usage: python crash_child.py ROOT BATCH_IMAGES
"""

import sys

import torch

from pyodlog.io import HDF5Store, WriterConfig
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger


def crash_logger(root, config=None) -> TinyDetectorLogger:
    """The logger of the crash tests' result (crash/v1/run); opening it recovers a dead writer's segment."""
    torch.manual_seed(0)
    return TinyDetectorLogger(
        TinyDetector().eval(),
        "crash",
        "v1",
        result_name="run",
        sink=HDF5Store(root, config=config),
        target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
    )


def kill(child, submitted: int) -> int:
    """SIGKILLs the child; returns how many images it had submitted (its last words are still in the pipe)."""
    import signal

    child.send_signal(signal.SIGKILL)
    child.wait()
    for line in child.stdout.read().splitlines():
        kind, value = line.split()
        if kind == "SUBMITTED":
            submitted = int(value)
    return submitted


def main() -> None:
    root, batch = sys.argv[1], int(sys.argv[2])
    # Blocking backpressure (opt-in): this child checks durability, so no call may be dropped.
    logger = crash_logger(
        root,
        WriterConfig(
            flush_interval=0.05, batch_images=8, segment_max_records=7, backpressure="block"
        ),
    )
    images = [torch.rand(3, 64, 64) for _ in range(batch)]
    sent = 0
    with torch.no_grad():
        for call in range(10**9):
            ids = [f"{sent + i:08d}" for i in range(batch)]
            print(f"SUBMITTED {sent + batch}", flush=True)
            logger(images, input_ids=ids)
            sent += batch
            if call % 3 == 0:
                logger.wait_for_save(interval=60)
                print(f"ACKED {sent}", flush=True)


if __name__ == "__main__":
    main()
