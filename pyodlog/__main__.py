"""``python -m pyodlog COMMAND …``: the ``pyodlog`` command (see :mod:`pyodlog.cli`)."""

import sys

from pyodlog.cli import main

sys.exit(main())
