"""One rank of a real ``torchrun --nproc_per_node=2`` job (gloo, CPU), driven by tests/test_distributed.py.

Modes:
  export  every rank logs its own images through the logger; export() is called on every rank.
  die     rank 1 SIGKILLs itself after acknowledged calls; rank 0 keeps logging until torchrun stops it.
  skip-export  like export, but rank 1 never calls export() (rank 0 must time out with a clear error).
  sync    every rank logs with auto_sync to the collector at PYODLOG_API_ENDPOINT and closes (no export).
Each rank writes what it saw to OUT/rank<r>.json (and, in 'die', its acknowledged input ids as it goes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision


def make_model():
    torch.manual_seed(0)  # the same weights on every rank
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5
    ).eval()


LOGGER_ARGS = dict(
    model_name="det",
    version_name="v1",
    score_thresh=0.05,
    max_detections_per_image=20,
    target_layers={"head_in": "backbone.features.0"},
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["export", "die", "skip-export", "sync"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--separate-homes", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.separate_homes:
        os.environ["PYODLOG_HOME"] = str(Path(os.environ["PYODLOG_HOME"]) / f"rank{rank}")
    import pyodlog

    report = {"rank": rank}
    logger = pyodlog.create_logger(make_model(), **LOGGER_ARGS)
    report.update(
        result_name=logger.result_name, n_epoch=logger.n_epoch, directory=str(logger.sink.directory)
    )
    g = torch.Generator().manual_seed(1000 + rank)  # different inputs on every rank
    acked_path = args.out / f"acked-rank{rank}.txt"
    ids = []
    with torch.inference_mode():
        call = 0
        while args.mode == "die" or call < args.calls:
            batch_ids = [f"r{rank}-c{call}-i{j}" for j in range(2)]
            detections = logger(
                [torch.rand(3, 160, 200, generator=g), torch.rand(3, 120, 160, generator=g)],
                input_ids=batch_ids,
            )
            report.setdefault("detections", []).extend(len(d["boxes"]) for d in detections)
            ids += batch_ids
            call += 1
            if args.mode == "die":
                logger.wait_for_save()
                with open(acked_path, "a") as f:  # acknowledged: must survive what follows
                    f.write("\n".join(batch_ids) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                if rank == 1 and call == args.calls:
                    os.kill(os.getpid(), signal.SIGKILL)
                if call > 400:
                    break  # bounded: torchrun stops this rank long before
                time.sleep(0.01)
    report["ids"] = ids
    if args.mode == "sync":
        logger.close()  # auto_sync sends the last segment before close() returns
        report["pending"] = len(logger.syncer.pending())
        (args.out / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        return
    try:
        if args.mode == "skip-export" and rank == 1:
            time.sleep(8)  # busy elsewhere: never reaches export()
            raise SystemExit(0)
        path = logger.export(args.out / "all.zip", timeout=3 if args.mode == "skip-export" else 60)
        report["export"] = None if path is None else str(path)
    except pyodlog.DistributedLoggingError as error:
        report["export_error"] = str(error)
    logger.close()
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
