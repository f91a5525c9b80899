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


def _ship_ready(wheel: Path, out_dir: Path) -> Path:
    """``wheel`` without declared dependencies, named by a hash of its contents (see the module's doc)."""
    with zipfile.ZipFile(wheel) as zin:
        infos = zin.infolist()
        files = {info.filename: zin.read(info) for info in infos}
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    metadata = next(n for n in files if n.endswith(".dist-info/METADATA"))
    files[metadata] = b"".join(line for line in files[metadata].splitlines(keepends=True)
                               if not line.startswith((b"Requires-Dist:", b"Provides-Extra:")))
    digests = {n: hashlib.sha256(data).digest() for n, data in files.items() if n != record}
    content = hashlib.sha256(b"".join(n.encode() + b"\0" + digests[n] for n in sorted(digests)))
    b64 = {n: base64.urlsafe_b64encode(digest).rstrip(b"=").decode() for n, digest in digests.items()}
    files[record] = "".join(f"{n},sha256={b64[n]},{len(files[n])}\n" if n != record else f"{n},,\n"
                            for n in files).encode()
    dist, version, *tags = wheel.stem.split("-")
    tags = tags[-3:]  # python, abi, platform; a build tag of pip's, if any, is replaced
    target = out_dir / f"{dist}-{version}-0{content.hexdigest()[:16]}-{'-'.join(tags)}.whl"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in infos:
            zout.writestr(info, files[info.filename])
    return target


def build_wheel(out_dir: Path) -> Path:
    """Build the project's wheel from its source tree into ``out_dir``, ready to ship in ``py_modules``."""
    import comod

    here, comod_dir = Path(__file__).resolve().parent, Path(comod.__file__).resolve().parent
    # the project's source tree that the installed comod_platform and comod come from
    root = next((d for d in here.parents if (d / "pyproject.toml").is_file() and comod_dir.is_relative_to(d)), None)
    if root is None:
        raise WheelError(f"--ship wheel builds the project's wheel from its source, but comod_platform is installed "
                         f"from {here}, with no source tree of the project above it; install the project from its "
                         f"source (pip install -e .), or pass --ship image when the cluster's image has comod")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comod-wheel-") as tmp:
        # the build writes build/ and *.egg-info beside its sources: it gets a copy of what it needs
        src, built = Path(tmp) / "src", Path(tmp) / "dist"
        src.mkdir()
        for path in [root / "pyproject.toml", root / "README.md", *root.glob("LICENSE*")]:
            if path.is_file():
                shutil.copy2(path, src / path.name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for package in (comod_dir, here):
            shutil.copytree(package, src / package.relative_to(root), ignore=ignore)
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                                   "-w", str(built), str(src)], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
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
