"""``python -m pyodlog_collector serve …`` (same as ``pyodlog serve …``)."""

import sys

from pyodlog_collector.cli import main

sys.exit(main())
