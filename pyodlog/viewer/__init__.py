"""``pyodlog view``: a local, read-only web app to look at what was logged.

A gallery of the logged images with their boxes (filters and sorts on the columns), a page per
image (every detection and near-miss with its top-5 classes and uncertainty) and a page per result
(class counts, histograms, a PCA map of detection embeddings). See :func:`serve`.
"""

from pyodlog.viewer.server import serve

__all__ = ["serve"]
