"""The installed Ray, Optuna and MLflow still serve comod_platform/compat.py's uses of their internals."""
from __future__ import annotations

from importlib.metadata import version

from comod_platform import compat


def test_the_installed_versions_serve_every_compat_use():
    installed = {name: version(name) for name in compat.CHECKED}
    found = compat.problems()
    assert not found, (f"comod_platform/compat.py was checked against {compat.CHECKED}, and the installed "
                       f"{installed} break: " + "; ".join(found))


def test_no_private_ray_optuna_or_mlflow_use_outside_compat():
    import re
    from pathlib import Path

    package = Path(compat.__file__).parent
    private = re.compile(r"\b(ray|optuna|mlflow)(\.\w+)*\._\w+|\bfrom (ray|optuna|mlflow)\S* import .*\b_[a-z]\w*"
                         r"|\b_system_config\b|\._(ot_\w+|trial_id|study_id|storage)\b")
    found = [f"{path.name}:{number}: {line.strip()}"
             for path in sorted(package.glob("*.py")) if path.name != "compat.py" for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not found, "private APIs used outside compat.py:\n" + "\n".join(found)
