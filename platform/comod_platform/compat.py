"""What comod uses of Ray, Optuna and MLflow beyond their public APIs: each use, why, and where it is checked.

Everything else goes through public APIs. Each use here was checked against
the versions in ``CHECKED``; :func:`problems` says which use an installed
version breaks, and tests/comod_platform/test_compat.py fails with that.
"""
from __future__ import annotations

import inspect
from pathlib import Path

CHECKED = {"ray": "2.60.0", "optuna": "5.1.0", "mlflow": "3.17.2"}
"""The versions every use below was checked against."""

LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}
"""``ray.init(_system_config=...)`` for a Ray the driver starts itself. Ray starts a worker per CPU for
a first driver's tasks before ``ray.init`` returns; a search runs no such task (each trial actor starts
in a worker of its own runtime environment), so those workers only take CPU from the search. No public
option of ``ray.init`` turns them off; an unknown key makes Ray's processes exit at start."""


def local_ray_options() -> dict:
    """Keyword arguments of ``ray.init`` for a local Ray (see ``LOCAL_RAY_SYSTEM_CONFIG``)."""
    return {"_system_config": dict(LOCAL_RAY_SYSTEM_CONFIG)}


def problems() -> list[str]:
    """The uses above that the installed versions break, each in one line (empty: none)."""
    import ray

    found = []
    if '"_system_config"' not in inspect.getsource(ray.init):  # read from **kwargs
        found.append(f"ray {ray.__version__}: ray.init has no _system_config argument (LOCAL_RAY_SYSTEM_CONFIG)")
    binary = Path(ray.__file__).parent / "_raylet.so"
    if binary.is_file():
        content = binary.read_bytes()
        found += [f"ray {ray.__version__}: Ray's config has no key {key!r} (LOCAL_RAY_SYSTEM_CONFIG); drop it "
                  f"from comod_platform/compat.py" for key in LOCAL_RAY_SYSTEM_CONFIG if key.encode() not in content]
    return found
