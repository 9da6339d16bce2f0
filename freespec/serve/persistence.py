"""``freespec serve --state FILE``: what the drafters learn (Token Recycling's tables, the suffix
drafter's per-tenant stores of earlier requests) survives a restart.

The file is loaded before the server starts (by the command line, as for ``generate``), saved
every ``interval`` seconds while requests end and once more when the server stops. The snapshot
is taken on the generation thread after a request ends, between passes, so it never waits for
the model's lock; the file is written by a thread of its own, atomically.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from freespec.api import Model
from freespec.drafters.state import write_state
from freespec.serve import DEFAULT_STATE_INTERVAL

log = logging.getLogger("freespec.serve")


class StateFile:
    """Saves ``model``'s learned drafter state to ``path``: :meth:`request_ended` on the generation
    thread, :meth:`close` once that thread has stopped. A failed write is logged, never raised:
    serving goes on, and the previous file stays whole."""

    def __init__(self, model: Model, path: Path, interval: float = DEFAULT_STATE_INTERVAL):
        path = Path(path)  # ``interval`` is checked with the server's other options (create_service)
        if path.is_dir() or not os.access(path.parent, os.W_OK):  # found now, not at the first save
            raise ValueError(f"cannot write the state file {path}: "
                             f"{'it is a directory' if path.is_dir() else 'its directory is missing or read-only'}")
        self.model, self.path, self.interval = model, path, interval
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="freespec-state")
        self._last = time.monotonic()
        self._pending: Future | None = None
        self.counted: Callable[[str], None] = lambda outcome: None  # told each save's outcome: "ok" or "failed"

    def request_ended(self) -> None:
        """Save if ``interval`` has passed since the last save and no write is under way."""
        if time.monotonic() - self._last < self.interval or (self._pending is not None and not self._pending.done()):
            return
        self._last = time.monotonic()
        try:
            arrays = self.model.learned_state()
        except Exception:
            log.exception("could not take the drafters' state")
            return
        self._pending = self._writer.submit(self._write, arrays)

    def close(self) -> None:
        """Wait for a write under way, then save what the drafters know now."""
        if self._pending is not None:
            self._pending.result()
        self._write(self.model.learned_state())
        self._writer.shutdown()

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        try:
            write_state(self.path, arrays)
        except OSError as error:
            log.error("could not save the drafters' state to %s: %s", self.path, error.strerror or error)
            self.counted("failed")
        else:
            self.counted("ok")
