"""`platform` is a standard-library module that torch, mlflow, ray and uuid
import; the repo's `platform/` folder must never shadow it (design.md). The
checks run from the repo root, where `python -c` puts the folder on sys.path."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_platform_folder_is_not_a_package():
    assert (REPO / "platform" / "comod_platform" / "__init__.py").is_file()
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "platform.py").exists()
    assert not (REPO / "tests" / "platform").exists()


def test_stdlib_platform_wins_from_the_repo_root():
    proc = python("import platform; print(platform.system()); print(platform.__file__)")
    assert proc.returncode == 0, proc.stderr
    system, origin = proc.stdout.split("\n")[:2]
    assert system == platform.system() and system
    assert not Path(origin).resolve().is_relative_to(REPO), origin


def test_platform_and_its_dependencies_import_from_the_repo_root():
    proc = python("import platform, uuid, comod_platform, torch, mlflow; "
                  "print(platform.system(), uuid.uuid4().version, comod_platform.__file__)")
    assert proc.returncode == 0, proc.stderr
    system, version, origin = proc.stdout.split()
    assert system == platform.system() and version == "4"
    assert Path(origin) == REPO / "platform" / "comod_platform" / "__init__.py"
