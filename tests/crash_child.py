"""A process that logs continuously until it is killed (tests/test_storage.py, benchmarks/soak_crash.py).

Prints ``SUBMITTED <images>`` before each call and ``ACKED <images>`` after each
``wait_for_save`` returns, flushing stdout, so the parent knows what was
acknowledged when it sends SIGKILL.
Usage: python crash_child.py ROOT BATCH_IMAGES
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from pyodlog.io import HDF5Store, WriterConfig  # noqa: E402
from tiny_models import TinyDetector, TinyDetectorLogger  # noqa: E402


def main() -> None:
    root, batch = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = TinyDetector().eval()
    store = HDF5Store(root, config=WriterConfig(flush_interval=0.05, batch_images=8, segment_max_records=7))
    logger = TinyDetectorLogger(model, "crash", "v1", result_name="run", sink=store,
                                target_layers={"b": {"path": "backbone.0", "compression": "uint8"}})
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
