"""The project's own wheel, ready to ship with a Ray job in ``py_modules``.

Ray installs it on each node with ``pip install WHEEL --target=DIR``, which would install every declared
dependency again: the shipped wheel declares none (they are the cluster's own). Ray skips the upload of a
file name it has, so the name carries a hash of the contents (the build tag): changed code is a new
package, unchanged code is uploaded and installed once.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class WheelError(RuntimeError):
    """The wheel cannot be built; the message says why and what to do instead."""


def source_root() -> Path:
    """The project's source tree that the installed ``comod_platform`` and ``comod`` come from."""
    import comod

    here = Path(__file__).resolve().parent
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file() and Path(comod.__file__).resolve().is_relative_to(folder):
            return folder
    raise WheelError(f"--ship wheel builds the project's wheel from its source, but comod_platform is installed "
                     f"from {here}, with no source tree of the project above it; install the project from its "
                     f"source (pip install -e .), or pass --ship image when the cluster's image has comod")


def _source_copy(root: Path, dest: Path) -> Path:
    """What the build needs from ``root`` (its packaging files and both packages), copied to ``dest``: the
    build writes ``build/`` and ``*.egg-info`` beside its sources, which stay untouched."""
    import comod

    dest.mkdir(parents=True)
    for path in [root / "pyproject.toml", root / "README.md", *root.glob("LICENSE*")]:
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in (Path(comod.__file__).resolve().parent, Path(__file__).resolve().parent):
        shutil.copytree(package, dest / package.relative_to(root), ignore=ignore)
    return dest


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _ship_ready(wheel: Path, out_dir: Path) -> Path:
    """``wheel`` without declared dependencies, named by a hash of its contents (see the module's doc)."""
    with zipfile.ZipFile(wheel) as zin:
        infos = zin.infolist()
        files = {info.filename: zin.read(info) for info in infos}
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    metadata = next(n for n in files if n.endswith(".dist-info/METADATA"))
    files[metadata] = b"".join(line for line in files[metadata].splitlines(keepends=True)
                               if not line.startswith((b"Requires-Dist:", b"Provides-Extra:")))
    content = hashlib.sha256()
    for name in sorted(files):
        if name != record:
            content.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    files[record] = "".join(f"{_record_line(n, d) if n != record else n + ',,'}\n"
                            for n, d in files.items()).encode()
    dist, version, *tags = wheel.stem.split("-")
    tags = tags[-3:]  # python, abi, platform; a build tag of pip's, if any, is replaced
    target = out_dir / f"{dist}-{version}-0{content.hexdigest()[:16]}-{'-'.join(tags)}.whl"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in infos:
            zout.writestr(info, files[info.filename])
    return target


def build_wheel(out_dir: Path, root: Path | None = None) -> Path:
    """Build the project's wheel from its source tree into ``out_dir``, ready to ship in ``py_modules``."""
    root = root or source_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comod-wheel-") as tmp:
        src = _source_copy(root, Path(tmp) / "src")
        built = Path(tmp) / "dist"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                   "-w", str(built), str(src)]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise WheelError(f"building the project's wheel failed ({err}); pass --ship image when the "
                             f"cluster's image has comod") from None
        wheels = sorted(built.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise WheelError(f"building the project's wheel from {root} failed: {' / '.join(tail)}; the build "
                             f"needs pip and setuptools in this environment; or pass --ship image when the "
                             f"cluster's image has comod")
        return _ship_ready(wheels[0], out_dir)
