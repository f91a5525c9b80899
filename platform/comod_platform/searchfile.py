"""Search files (search_spaces/NAME.yaml): a base ``experiment``, a ``space`` of dotted config paths to
distributions (sampled define-by-run or as a grid) and ``search`` settings (docs/guides/searches.md); the
whole file is checked before any trial starts."""
from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from comod.config import ConfigError, ExperimentConfig, flatten, parse_config, read_yaml, set_path
from comod.metric_names import METRICS as _METRIC_NAMES
from comod.schema import check, from_dict

METRICS = tuple(f"val/mean_{m}" for m in _METRIC_NAMES)
SEARCH_SPACES = Path("search_spaces")
"""Where a search named without a path is found (``NAME`` -> search_spaces/NAME.yaml), from the working folder."""


@dataclass
class Dist:
    """One distribution: ``type: float|int`` with ``low``/``high`` (``log``, ``step``),
    or ``type: categorical`` with ``choices``; ``when`` makes it conditional."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str):
        if self.type == "categorical":
            check(bool(self.choices), f"{path}.choices", self.choices, "a non-empty list for type: categorical")
            check(self.low is None and self.high is None and not self.log and self.step is None, path,
                  "low/high/log/step", "only choices (and when) for type: categorical")
            return
        check(self.choices is None, f"{path}.choices", self.choices, f"no choices for type: {self.type}")
        check(self.low is not None and self.high is not None, path, (self.low, self.high),
              f"both low and high for type: {self.type}")
        if self.type == "int":
            for key, value in (("low", self.low), ("high", self.high)):
                check(float(value).is_integer(), f"{path}.{key}", value, "an integer for type: int")
        check(self.low <= self.high, path, f"(low={self.low}, high={self.high})", "low <= high")
        check(not self.log or self.low > 0, f"{path}.low", self.low, "low > 0 with log: true")
        check(self.step is None or self.step > 0, f"{path}.step", self.step, "a positive step")
        check(not (self.log and self.step is not None), path, "log and step", "either log or step, not both")

    def active(self, values: dict[str, Any], base: dict[str, Any]) -> bool:
        """Whether the ``when`` condition holds for ``values`` (a setting not in them: its ``base`` value)."""
        return all(values.get(k, base.get(k)) == v for k, v in self.when.items())

    def values_to_check(self) -> list[Any]:
        """Values that must all pass the experiment loader: the bounds, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(v) if self.type == "int" else v for v in (self.low, self.high)]


@dataclass
class Scheduler:
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    """Epochs (reports) a trial runs before ASHA may stop it."""
    reduction_factor: float = 2.0

    def validate(self, path: str):
        check(self.grace_period >= 1, f"{path}.grace_period", self.grace_period, "an integer >= 1")
        check(self.reduction_factor > 1, f"{path}.reduction_factor", self.reduction_factor, "a number > 1")


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0
    """GPUs per trial; a fraction (e.g. 0.25) packs several trials on one GPU."""

    def validate(self, path: str):
        check(self.cpu > 0, f"{path}.cpu", self.cpu, "a positive number of CPUs")
        check(self.gpu >= 0, f"{path}.gpu", self.gpu, "a number >= 0")
        check(self.gpu <= 1 or float(self.gpu).is_integer(), f"{path}.gpu", self.gpu,
              "a fraction <= 1 or a whole number of GPUs")


@dataclass
class SearchSettings:
    metric: str = "val/mean_f1"
    mode: Literal["max", "min"] = "max"
    num_trials: int = 8
    sampler: Literal["tpe", "random", "cmaes", "qmc", "grid"] = "tpe"
    """grid: every combination of the space's choices (no float ranges), the first path varying slowest."""
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 2
    max_retries: int = 2
    """Times a crashing trial is restarted from its last epoch checkpoint before it counts as failed."""
    checkpoint_interval_s: float = 10.0
    """Seconds of training a crash may lose: an epoch's checkpoint is stored when this long has passed since
    the trial's last one (0: every epoch); the final report always carries one."""
    seed: int = 0
    trial_timeout_s: float | None = None
    """Wall seconds a trial may take (None: no limit); past it the trial fails, is not retried."""
    stall_timeout_s: float | None = None
    """Seconds a trial may go without a step or a report (None: no check); past it the trial fails."""

    def validate(self, path: str):
        for key, least in (("num_trials", 1), ("max_concurrent", 1), ("max_retries", 0)):
            check(getattr(self, key) >= least, f"{path}.{key}", getattr(self, key), f"an integer >= {least}")
        for key in ("trial_timeout_s", "stall_timeout_s"):
            value = getattr(self, key)
            check(value is None or value > 0, f"{path}.{key}", value, "a number of seconds > 0, or null (no limit)")
        check(self.checkpoint_interval_s >= 0, f"{path}.checkpoint_interval_s", self.checkpoint_interval_s,
              "a number of seconds >= 0 (0: every epoch)")
        check(self.metric in METRICS, f"{path}.metric", self.metric,
              f"a validation metric reported every epoch: {', '.join(METRICS)} (never a test/ metric)")


@dataclass
class SearchFile:
    name: str
    experiment: dict
    """The base experiment as plain data (what `comod train` would run)."""
    space: dict[str, Dist]
    search: SearchSettings

    def base_config(self) -> ExperimentConfig:
        return parse_config(self.experiment, "experiment")

    @cached_property
    def _base_flat(self) -> dict[str, Any]:
        return flatten(self.base_config())

    def config_for(self, flat: dict[str, Any]) -> ExperimentConfig:
        """The experiment of one trial: the base with ``{dotted.path: value}`` set."""
        raw = copy.deepcopy(self.experiment)
        for path, value in flat.items():
            set_path(raw, path, value)
        return parse_config(raw, "trial")

    def epochs_per_phase(self) -> dict[str, int]:
        """The most epochs a trial can train in each phase (its base's, or the space's largest)."""
        most = {}
        for phase in ("pretrain", "finetune"):
            dist = self.space.get(f"{phase}.epochs")
            values = [self._base_flat[f"{phase}.epochs"], *(dist.values_to_check() if dist else [])]
            most[phase] = max(int(v) for v in values)
        return most

    def max_epochs(self) -> int:  # ASHA's clock
        return sum(self.epochs_per_phase().values())

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points (Optuna labels), the first path varying slowest; a conditional path only
        where its condition holds."""
        points: list[dict[str, Any]] = [{}]
        for path, dist in self.space.items():
            choices = ([encode_choice(c) for c in dist.choices] if dist.type == "categorical"
                       else range(int(dist.low), int(dist.high) + 1, int(dist.step or 1)))
            grown = []
            for point in points:
                active = dist.active({k: decode_choice(v) for k, v in point.items()}, self._base_flat)
                grown.extend([{**point, path: c} for c in choices] if active else [point])
            points = grown
        return points

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest every active path, return ``{path: value}``."""
        values: dict[str, Any] = {}
        for path, dist in self.space.items():
            if not dist.active(values, self._base_flat):
                continue
            if dist.type == "float":
                values[path] = trial.suggest_float(path, dist.low, dist.high, log=dist.log, step=dist.step)
            elif dist.type == "int":
                values[path] = trial.suggest_int(path, int(dist.low), int(dist.high), log=dist.log,
                                                 step=int(dist.step or 1))
            else:
                values[path] = decode_choice(trial.suggest_categorical(path, [encode_choice(c) for c in dist.choices]))
        return values


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: lists (e.g. several sites) become JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode_choice(label: Any) -> Any:
    return json.loads(label) if isinstance(label, str) and label[:1] in "[{" else label


def _check_condition(where: str, path: str, key: str, value: Any, dist: Dist | None, settable: dict) -> None:
    """A ``when`` value its setting can take; else the setting it guards would never be sampled."""
    if dist is None:
        if value != settable[key]:
            raise ConfigError(f"{where}.when: {key} is not searched and is {settable[key]!r} in the experiment, never "
                              f"{value!r}, so {path} would never be sampled; search {key} (listed before {path}) "
                              f"or change the condition")
        return
    if dist.type == "categorical":
        if any(value == choice for choice in dist.choices):
            return
        shown = [str(c) for c in dist.choices]
        close = difflib.get_close_matches(str(value), shown, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}.when: {key} is {value!r}, which is not one of its choices ({', '.join(shown)}), "
                          f"so {path} would never be sampled{hint}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not dist.low <= value <= dist.high:
        raise ConfigError(f"{where}.when: {key} is {value!r}, outside its range [{dist.low:g}, {dist.high:g}], "
                          f"so {path} would never be sampled")


def _did_you_mean(path: str, settable) -> str:
    """The closest setting to an unknown path, else to its last part (``noise_scal`` -> ``modulation.noise_scale``)."""
    names = list(settable)
    inside = [name for name in names if name.startswith(f"{path}.")]
    if inside:  # a section, not a setting
        return f"{path} is a section; search one of its settings: {', '.join(inside[:8])}"
    close = difflib.get_close_matches(path, names, n=1)
    if not close:
        leaves = {name.rsplit(".", 1)[-1]: name for name in reversed(names)}  # a leaf's first setting
        close = [leaves[leaf] for leaf in difflib.get_close_matches(path.rsplit(".", 1)[-1], list(leaves), n=1)]
    hint = "settings look like modulation.noise_scale or finetune.lr.controller"
    return f"did you mean {close[0]}?" if close else hint


def parse_search(raw: Any, name: str) -> SearchFile:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping with experiment, space and search")
    if unknown := set(raw) - {"experiment", "space", "search"}:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section; a search file has experiment, space, search")
    experiment = raw.get("experiment") or {}
    try:
        settable = flatten(parse_config(experiment, "experiment"))
    except ConfigError as err:
        raise ConfigError(f"experiment.{err}") from None
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise ConfigError(f"space: got {space_raw!r}; expected a mapping of dotted paths to distributions")
    space: dict[str, Dist] = {}
    for path, dist_raw in space_raw.items():
        where = f"space.{path}"
        if path not in settable:
            raise ConfigError(f"{where}: not a setting of the experiment; {_did_you_mean(path, settable)}")
        if not isinstance(dist_raw, dict):
            raise ConfigError(f"{where}: got {dist_raw!r}; expected a distribution such as "
                              f"{{type: float, low: 0.1, high: 1.0}} or {{type: categorical, choices: [...]}}")
        dist = from_dict(Dist, dist_raw, where)
        for key, value in dist.when.items():
            if key not in settable:
                raise ConfigError(f"{where}.when: {key!r} is not a setting of the experiment; "
                                  f"{_did_you_mean(str(key), settable)}")
            if key in space_raw and list(space_raw).index(key) > list(space_raw).index(path):
                raise ConfigError(f"{where}.when: {key} is searched after {path}; list it first in space")
            _check_condition(where, path, key, value, space.get(key), settable)
        space[path] = dist
    search = from_dict(SearchSettings, raw.get("search") or {}, "search")
    sf = SearchFile(name=name, experiment=experiment, space=space, search=search)
    if search.sampler == "grid":
        for path, dist in space.items():
            check(dist.type != "float", f"space.{path}.type", dist.type,
                  "int or categorical with search.sampler: grid (a float range has no grid)")
        points = len(sf.grid_points())
        check(search.num_trials == points, "search.num_trials", search.num_trials,
              f"{points}, the number of points of the grid")
    if search.scheduler.type == "asha":
        phases, grace = sf.epochs_per_phase(), search.scheduler.grace_period
        check(grace <= sf.max_epochs(), "search.scheduler.grace_period", grace,
              f"at most {sf.max_epochs()}, the epochs a trial trains (pretrain.epochs {phases['pretrain']} + "
              f"finetune.epochs {phases['finetune']}): ASHA may stop a trial only after grace_period epochs")
    for path, dist in space.items():
        for value in dist.values_to_check():
            try:
                sf.config_for({path: value})
            except ConfigError as err:
                raise ConfigError(f"space.{path}: the value {value!r} is not a valid setting ({err})") from None
    return sf


def load_search(path: str | Path) -> SearchFile:
    """Load and check a search file; ``NAME`` alone looks in search_spaces/."""
    return parse_search(*read_search(path))


def resolve_search_path(name_or_path: str | Path) -> Path:
    """That path, or search_spaces/NAME.yaml for a ``NAME`` (no suffix) that is no path here."""
    path, named = Path(name_or_path), SEARCH_SPACES / f"{name_or_path}.yaml"
    return named if not path.exists() and not path.suffix and named.exists() else path


def read_search(path: str | Path) -> tuple[dict, str]:
    """A search file's YAML and its name, unchecked (a missing file or broken YAML fails here, without torch)."""
    path = resolve_search_path(path)
    if not path.is_file():
        known = sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml"))
        hint = f"; searches in search_spaces/: {', '.join(known)}" if known else ""
        raise ConfigError(f"{path}: no such search file{hint}")
    return read_yaml(path), path.stem
