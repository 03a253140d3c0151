"""Debug mode: checks that read tensor data (index ranges, NaN/Inf, ``mask.all()``) run only here.

Shape, dtype and device checks are free (tensor metadata) and always run. Checks that must read tensor
*values* force a host synchronisation on a GPU (and a graph break under ``torch.compile``), so the decode
hot path skips them unless debug mode is on: ``TOKPRUNE_DEBUG=1`` in the environment at import time, or
:func:`set_debug` at run time. The test suite turns it on (``tests/conftest.py``).
"""

from __future__ import annotations

import os

_DEBUG = os.environ.get("TOKPRUNE_DEBUG", "0") not in ("", "0", "false", "False")


def debug_checks() -> bool:
    """``True`` when data-reading checks should run (``TOKPRUNE_DEBUG=1`` or :func:`set_debug(True)`)."""
    return _DEBUG


def set_debug(enabled: bool) -> bool:
    """Turn debug checks on or off; returns the previous setting."""
    global _DEBUG
    previous, _DEBUG = _DEBUG, bool(enabled)
    return previous
