"""What ``make demo`` needs besides pyodlog itself: generated scenes, a small trained detector, fair timing.

- :mod:`pyodlog.demokit.scenes`: deterministic scenes of shapes (circle, square,
  triangle, star) on textured backgrounds, with exact ground-truth boxes, in a
  ``val`` domain and a shifted ``deploying`` domain.
- :mod:`pyodlog.demokit.detector`: the demo's small Faster R-CNN and its committed
  float16 weights (checked by SHA-256 when loaded).
- :mod:`pyodlog.demokit.train`: the script that trained those weights, and
  ``load_detector`` (the shipped weights, or a quick retrain when they are missing).
- :mod:`pyodlog.demokit.timing`: paired-rotation timing (warm-up, alternating
  order, ratios with their spread), shared with ``benchmarks/overhead_paired.py``.

This package sits at the top layer, beside :mod:`pyodlog.demo` and :mod:`pyodlog.cli`.
"""
