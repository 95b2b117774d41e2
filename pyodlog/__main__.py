"""``python -m pyodlog serve …``: the ``pyodlog`` command (see :mod:`pyodlog_collector.cli`).

The ``pyodlog`` script itself starts faster: it does not import torch.
"""

import sys

from pyodlog_collector.cli import main

sys.exit(main())
