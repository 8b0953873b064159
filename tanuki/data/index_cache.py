"""On-disk cache for the sample indices of the GPT and blended datasets.

Each cached index is a set of ``.npy`` arrays named ``<kind>-<hash>-<array>.npy`` plus a
``<kind>-<hash>.json`` description, where the hash covers everything the arrays depend on (as
Megatron does with its ``unique_description_hash``). The description is written last and marks the
entry complete, so a reader never sees half an entry.

Several ranks usually start at once and ask for the same index. One takes an exclusive ``flock`` on
``<kind>-<hash>.lock`` and builds; the others block on the same lock and, once it is released, find
the finished entry and load it. Every file is written under a temporary name and renamed into place,
so a process killed halfway leaves no file that looks complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

#: bump when the way an index is built changes, so that stale caches are not reused
INDEX_FORMAT = 1


def describe_hash(description: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> str:
    """A stable hex digest of a JSON-able description and (by content) some numpy arrays."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"format": INDEX_FORMAT, **description}, sort_keys=True).encode())
    for name, arr in sorted((arrays or {}).items()):
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, mode: str, write: Callable[[IO], Any]) -> None:
    """Write ``path`` with ``write(f)`` (a file opened with ``mode``) under a temporary name, synced to
    disk, then renamed into place: ``path`` is complete or absent, never half written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    _write_atomic(path, "wb", lambda f: np.save(f, arr, allow_pickle=False))


def _write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, "w", lambda f: f.write(text))


def load_or_build(
    cache_dir: str | os.PathLike | None,
    kind: str,
    key: str,
    description: dict[str, Any],
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], bool]:
    """Return the arrays ``names`` of the index ``kind``/``key``, building and caching them if needed.

    ``build()`` returns a dict with those arrays. Cached arrays come back memory-mapped. With
    ``cache_dir=None`` nothing is cached. The second value says whether this call built the index.
    """
    if cache_dir is None:
        return build(), True
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{key}"
    done = cache / f"{stem}.json"
    paths = {n: cache / f"{stem}-{n}.npy" for n in names}

    def load() -> dict[str, np.ndarray]:
        return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}

    if done.is_file():
        return load(), False
    with _locked(cache / f"{stem}.lock"):
        if done.is_file():  # another process built it while we waited for the lock
            return load(), False
        arrays = build()
        for n, p in paths.items():
            _save_atomic(p, arrays[n])
        _write_text_atomic(done, json.dumps({"format": INDEX_FORMAT, **description}, indent=2, sort_keys=True) + "\n")
    return load(), True
