"""The runs folder, ``$COMOD_HOME`` if set, else ``./comod-runs`` (its layout: docs/architecture.md), and
one-line messages for a folder that cannot be written."""
from __future__ import annotations

import errno
import os
from contextlib import suppress
from pathlib import Path


def runs_home() -> Path:
    return Path(os.environ.get("COMOD_HOME", "comod-runs")).resolve()


def disk_message(err: OSError, where: Path, what: str = "--out") -> str:
    """One line for a write that failed: the file, why, and what to change (``what``: the setting)."""
    path = err.filename or where
    if err.errno == errno.ENOSPC:
        return (f"no space left on the disk writing {path}; free space there (or choose another {what}), then "
                f"run the same command again: it resumes from the last checkpoint")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path} ({err.strerror}); choose a writable {what}"
    return f"cannot write {path} ({err.strerror or err}); check the disk and {what}"


def unwritable(folder: Path, what: str) -> str | None:
    """Why ``folder`` cannot take a file, in one line; None when it can. Folders made for the probe go again."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".comod-write-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        return disk_message(err, folder, what)
    finally:
        with suppress(OSError):  # deepest first, up to one that holds something else
            for path in made:
                path.rmdir()
    return None
