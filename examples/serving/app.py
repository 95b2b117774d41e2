"""A FastAPI server sharing one pyodlog logger between its worker threads.

Run it (from the repository root, after ``make build``)::

    uvicorn app:app --app-dir examples/serving --port 8000 --workers 2

and send an image::

    curl --data-binary @photo.png -H "Content-Type: image/png" \
        "http://127.0.0.1:8000/predict?input_id=photo-1"

Each request is decoded, run through the detector in a thread pool by
``await logger.acall(...)`` (the model and the logging both off the event loop)
and answered with that call's detections, while pyodlog records the call in
the background. Every uvicorn worker process has its own logger; all of them
log into one result (``PYODLOG_SERVING_RESULT``), each into its own segment
files. On shutdown each worker closes its logger: calls in flight finish and
are stored first.

Settings (environment variables):

- ``PYODLOG_SERVING_MODEL``: ``module:function`` returning the detector in eval
  mode (default: torchvision's Faster R-CNN MobileNetV3-320 with random
  weights -- replace it with your trained model).
- ``PYODLOG_SERVING_RESULT``: the result every worker logs into (default
  ``serving``); give one name so that the workers share it.
- ``PYODLOG_SERVING_THREADS``: threads running the model per worker (default 4).
- ``PYODLOG_SERVING_SCORE_THRESH``: the model's score threshold (default: the model's).
- ``PYODLOG_HOME``: where the records go (default ``./pyodlog_data``).

``GET /metrics`` is the Prometheus endpoint (``prometheus_client``'s ASGI app, when it is
installed): the logger registers its ``pyodlog_*`` metrics on the default registry, so they show
there beside the app's own. With several uvicorn workers each process answers for itself: scrape
one port per worker (or run one worker per container).
"""

from __future__ import annotations

import importlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
import torchvision.transforms.functional as TF
from fastapi import FastAPI, HTTPException, Request
from PIL import Image, UnidentifiedImageError

import pyodlog


def default_model() -> torch.nn.Module:
    """torchvision's Faster R-CNN MobileNetV3-320 (random weights: load your own)."""
    from torchvision.models import detection

    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None
    ).eval()


def load_model() -> torch.nn.Module:
    spec = os.environ.get("PYODLOG_SERVING_MODEL")
    if not spec:
        return default_model()
    module_name, _, function = spec.partition(":")
    if not function:
        raise ValueError(f"PYODLOG_SERVING_MODEL must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), function)()


@asynccontextmanager
async def lifespan(app: FastAPI):
    threshold = os.environ.get("PYODLOG_SERVING_SCORE_THRESH")
    app.state.logger = pyodlog.create_logger(
        load_model(),
        model_name="detector",
        version_name="v1",
        result_name=os.environ.get("PYODLOG_SERVING_RESULT", "serving"),
        score_thresh=float(threshold) if threshold else None,
    )
    app.state.pool = ThreadPoolExecutor(
        int(os.environ.get("PYODLOG_SERVING_THREADS", "4")), thread_name_prefix="model"
    )
    try:
        yield
    finally:
        app.state.pool.shutdown(wait=True)
        app.state.logger.close()  # waits for calls in flight, stores their records


app = FastAPI(title="pyodlog serving example", lifespan=lifespan)

try:  # the serving stack's own /metrics: pyodlog_* appear there (create_logger's metrics=None)
    from prometheus_client import make_asgi_app
except ImportError:  # pragma: no cover - prometheus_client is pinned in requirements/pins.txt
    pass
else:
    app.mount("/metrics", make_asgi_app())


@app.post("/predict")
async def predict(request: Request, input_id: str) -> dict:
    """Detections of the image in the request body (PNG or JPEG): boxes xyxy in its pixels."""
    body = await request.body()
    try:
        image = Image.open(io.BytesIO(body)).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise HTTPException(400, f"the body is not a PNG or JPEG image: {error}") from error
    images = [TF.to_tensor(image)]  # [3, H, W] in [0, 1]
    logger = request.app.state.logger
    # The model and the logging run in the pool (under torch.inference_mode()), off the event loop.
    (detections,) = await logger.acall(images, [input_id], executor=request.app.state.pool)
    return {
        "input_id": input_id,
        "boxes": detections["boxes"].tolist(),
        "scores": detections["scores"].tolist(),
        "labels": detections["labels"].tolist(),
    }


@app.get("/health")
async def health() -> dict:
    return {"ok": True}
