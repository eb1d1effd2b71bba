"""``python -m napari_strainer.cli``: the ``strainer`` command."""

import sys

from . import main

sys.exit(main())
