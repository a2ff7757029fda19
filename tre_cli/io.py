"""Files written safely, in one place: atomic replacement of a file or a directory, and JSON-lines
logs that concurrent writers append to without tearing a line.

A reader of a file written here sees its old content or its new one, never a part: the new
content goes to a temporary name beside the file and is renamed over it (rename is atomic
within a filesystem).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

try:  # fcntl is POSIX-only; O_APPEND alone keeps appends whole on local Linux filesystems.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("tre")

PathLike = str | Path


@contextlib.contextmanager
def atomic_path(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write to (same suffix, so writers that go by it
    choose the right format); it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=final.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a text file (UTF-8, fsynced) so that readers see the old content or the new."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return path


@contextlib.contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; it becomes `final` only if the block succeeds.

    A crash mid-write leaves a `.tmp-*` directory (which checkpoint listings ignore), never a
    half-written `final`. An existing `final` is replaced (a step saved again after a resume).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Rename the finished directory `tmp` to `final` (on the same file system), replacing an
    existing `final`: the old one is renamed aside first and removed after, so `final` is never
    half-written. atomic_dir's last step; also for a directory several processes write into."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def append_line(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write under an exclusive lock, then fsync.

    Concurrent writers (sweep trials finishing together) never interleave or tear lines.
    """
    data = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, data)
        if written != len(data):  # only on a full disk: say so rather than leave a torn line unnoticed
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] if it does not exist).

    A last line without its newline is a write cut off by a crash and is skipped; a bad line
    anywhere else is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # the final fragment after the last newline
                log.warning("%s:%d: skipping a line cut off mid-write", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return records


def truncate_jsonl_after(path: PathLike, step: int) -> int:
    """Keep only the records with record['step'] <= step (atomically); returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_jsonl(path)
    kept = [record for record in records if record["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return len(records) - len(kept)
