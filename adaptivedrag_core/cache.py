"""The disk cache (``--cache-dir``): results kept across runs, and the content hashes of model files.

Every entry is written atomically (:func:`outputs.atomic_write`), so an interrupted run never leaves a truncated
entry. An entry that cannot be read anyway (damaged on disk, written by something else) is reported with a
:class:`CacheWarning` of one line and computed again, which replaces it; it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Iterable

from .errors import InputError
from .outputs import atomic_write, partial_path

#: The file, inside the cache folder, that remembers each hashed file's digest by its size and modification time.
FILE_HASHES = "file-hashes.json"


class CacheWarning(UserWarning):
    """A cache entry could not be read and is computed again."""


class DiskCache:
    """One cache folder.

    Args:
        folder: where the entries live; created when the first entry is written.
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def check(self) -> None:
        """Raise InputError unless the folder is (or can become) a folder where files can be written.

        Nothing is left behind: a probe file is made in the folder, or in the nearest existing folder above it,
        and removed at once.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"cache folder {self.folder} is a file, not a folder")
        existing = next(folder for folder in (self.folder, *self.folder.absolute().parents) if folder.exists())
        if not existing.is_dir():
            raise InputError(f"cache folder {self.folder}: {existing} is a file, not a folder")
        probe = partial_path(existing / "adaptivedrag-cache-probe")
        try:
            probe.open("wb").close()
            probe.unlink()
        except OSError as err:
            raise InputError(f"cache folder {self.folder}: cannot write in {existing} ({err.strerror or err})") from None

    def load(self, name: str, read: Callable[[Path], object]):
        """The entry ``name`` read with ``read(path)``, or None when it is absent or cannot be read (reported)."""
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return read(path)
        except Exception as err:  # whatever the damage, the entry is recomputed: it must never stop a run
            warnings.warn(f"cache entry {path} cannot be read ({_one_line(err)}); computing it again", CacheWarning,
                          stacklevel=2)
            return None

    def save(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write the entry ``name`` atomically through ``write(temporary_path)``; returns its path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.folder / name, write)

    # ------------------------------------------------------------------------------------ file hashes
    def fingerprint(self, files: Iterable[tuple[str, Path]]) -> str:
        """One hash of several files' content, e.g. every weight file of a model, for cache keys.

        Args:
            files: (name, path) pairs; the name (e.g. the path inside a model folder) is part of the hash, the
                file's location is not, so a moved model keeps its cached results.

        Each file's SHA-256 is computed once and remembered (in :data:`FILE_HASHES`) by its path, size and
        modification time, so later runs only look at the files' sizes and times.
        """
        remembered = self.load(FILE_HASHES, _read_hashes) or {}
        digest = hashlib.sha256()
        changed = False
        for name, path in sorted(files):
            stat = path.stat()
            key = str(path.resolve())
            known = remembered.get(key)
            if known is None or known[:2] != [stat.st_size, stat.st_mtime_ns]:
                remembered[key] = [stat.st_size, stat.st_mtime_ns, file_sha256(path)]
                changed = True
            digest.update(json.dumps([name, remembered[key][2]]).encode())
        if changed:
            self.save(FILE_HASHES, lambda partial: partial.write_text(json.dumps(remembered), encoding="utf-8"))
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read in chunks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_hashes(path: Path) -> dict:
    hashes = json.loads(path.read_text(encoding="utf-8"))
    valid = isinstance(hashes, dict) and all(
        isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str) for entry in hashes.values())
    if not valid:
        raise ValueError("not a table of file hashes")
    return hashes


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
