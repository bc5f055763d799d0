"""The concurrency modes: one module each, chosen by the ``mode`` setting.

The modes are declared once, in :data:`echod.config.MODES`; mode ``name`` is served by class
``<Name>Worker`` in module ``echod.workers.<name>`` (``async_`` for ``async``, a keyword).
Each is imported on demand so that a mode's optional dependencies (uvloop) are only needed
when that mode is used.
"""

from __future__ import annotations

import importlib
import keyword

from echod.config import MODES
from echod.worker import Worker

__all__ = ["MODES", "module_name", "worker_class"]


def module_name(mode: str) -> str:
    """The module that serves ``mode``."""
    if mode not in MODES:
        raise ValueError(f"not a mode: {mode!r} (one of {', '.join(MODES)})")
    return f"echod.workers.{mode}_" if keyword.iskeyword(mode) else f"echod.workers.{mode}"


def worker_class(mode: str) -> type[Worker]:
    """The Worker subclass that serves ``mode``."""
    cls: type[Worker] = getattr(importlib.import_module(module_name(mode)), f"{mode.title()}Worker")
    return cls
