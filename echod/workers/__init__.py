"""The concurrency modes: one module each, chosen by the ``mode`` setting."""

from __future__ import annotations

import importlib

from echod.worker import Worker

# mode -> "module:class"; imported on demand so that a mode's optional dependencies (uvloop)
# are only needed when that mode is used.
MODES: dict[str, str] = {
    "thread": "echod.workers.thread:ThreadWorker",
    "process": "echod.workers.process:ProcessWorker",
    "async": "echod.workers.async_:AsyncWorker",
}


def worker_class(mode: str) -> type[Worker]:
    """The Worker subclass that serves ``mode``."""
    module_name, _, class_name = MODES[mode].partition(":")
    cls: type[Worker] = getattr(importlib.import_module(module_name), class_name)
    return cls
