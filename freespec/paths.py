"""Where freespec keeps what it builds once per machine (GGUF metadata, kernels, calibrations),
and how it writes files that others read: atomically, so no reader and no crash sees half a file."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import IO


def cache_dir() -> Path:
    """``$FREESPEC_CACHE``, else ``$XDG_CACHE_HOME/freespec``, else ``~/.cache/freespec``."""
    if explicit := os.environ.get("FREESPEC_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "freespec"


RECENT_SECONDS = 600
"""A cache entry (a metadata folder, a kernel build) used this recently is never evicted: another
process may be reading it, or about to."""


def touch(path: Path) -> None:
    """Mark a cache entry used now (its modification time orders eviction); a read-only cache is fine."""
    try:
        os.utime(path)
    except OSError:
        pass


class AtomicFile:
    """A text (or ``binary``) file written under a temporary name beside ``path`` and renamed onto it by
    :meth:`commit`: until then ``path`` keeps its old content (or stays absent), whatever happens
    to the writer. Leaving the ``with`` block without a commit deletes the temporary file.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with AtomicFile(path) as file:
    ...     _ = file.write("new")
    ...     path.exists()
    False
    >>> with AtomicFile(path) as file:
    ...     _ = file.write("newer")
    ...     file.commit()
    >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())
    ('newer', ['out.txt'])
    """

    def __init__(self, path: str | os.PathLike, binary: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.path))
        # a name of our own in the same folder (so the rename stays on one file system); opened
        # with "x" like any new file, so it gets the usual permissions
        self.temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
        self._file = open(self.temporary, "xb") if binary else open(self.temporary, "x", encoding="utf-8")
        self.committed = False

    @property
    def stream(self) -> IO:
        """The temporary file itself, for writers that seek (numpy's archives)."""
        return self._file

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def commit(self) -> None:
        """Put what was written in place of ``path`` (flushed to disk first, so a crash right
        after cannot leave an empty file under the new name)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temporary, self.path)
        self.committed = True

    def discard(self) -> None:
        self._file.close()
        self.temporary.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            self.discard()


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (its folder is created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as file:
        file.write(text)
        file.commit()
