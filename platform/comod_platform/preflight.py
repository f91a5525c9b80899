"""Checks a search passes before anything of it is made (run) or before it goes on (resume); each failure
is a :class:`SearchError` saying what to do."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from comod_platform import storage as storage_mod
from comod_platform.conventions import TAG_SEARCH_ID, experiment_name
from comod_platform.credentials import redact, redact_all
from comod_platform.search_state import SearchMeta, SearchPaths, first_difference, search_hash, versions


class SearchError(RuntimeError):
    """A search cannot start or resume; the message says why and what to do."""


def check_optuna_storage(url: str) -> None:
    """Open one connection to the study's database, so a bad one stops the search before anything is made."""
    if url.startswith("sqlite:"):
        return
    try:
        import sqlalchemy

        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse
        raise SearchError(f"Optuna storage {redact(url)!r} (COMOD_OPTUNA_STORAGE) is not a database URL; use e.g. "
                          f"postgresql+psycopg2://USER:PASSWORD@HOST:5432/optuna, or unset it to keep the study "
                          f"in SQLite in the search folder") from None
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if "postgres" in url else {})
        engine.connect().close()
        engine.dispose()
    except ModuleNotFoundError as err:
        raise SearchError(f"Optuna storage {shown} (COMOD_OPTUNA_STORAGE) needs the driver {err.name}: "
                          f"pip install 'comod[cluster]'") from None
    except Exception as err:  # noqa: BLE001
        first = redact_all(str(getattr(err, "orig", None) or err).strip().splitlines()[0][:300])
        raise SearchError(f"Optuna storage {shown} (COMOD_OPTUNA_STORAGE) cannot be used: {first}; start the "
                          f"database or fix the URL, or unset COMOD_OPTUNA_STORAGE to keep the study in SQLite "
                          f"in the search folder") from None


def refuse_existing(paths: SearchPaths, locked: bool = False) -> None:
    """Refuse a name taken in this runs folder by a live driver (unless ``locked``: this one) or a search."""
    if not locked:
        paths.check_not_busy()
    if paths.exists():
        raise SearchError(f"a search named {paths.name!r} exists already ({paths.root}); continue it with "
                          f"`comod search resume {paths.name}`, or choose another --name")


def _experiment(tracking: str, name: str):
    from mlflow.tracking import MlflowClient

    from comod_platform.writer import retry_call

    return retry_call(MlflowClient(tracking_uri=tracking).get_experiment_by_name, experiment_name(name))


def _study_owner(url: str, name: str) -> str | None:
    import optuna

    storage = optuna.storages.RDBStorage(url)
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(TAG_SEARCH_ID, "")
    except KeyError:
        return None


def claim_stores(name: str, search_id: str, optuna_url: str, tracking: str) -> None:
    """A new search's name must be free in the tracking store and the Optuna database, which a team may
    share: an experiment ``search/NAME`` or a study ``NAME`` of another search folder is refused; one of
    this folder (a start that failed half-way) is this search's."""
    found = _experiment(tracking, name)
    if found is not None and found.tags.get(TAG_SEARCH_ID) != search_id:
        deleted = " (deleted, and its name stays taken)" if found.lifecycle_stage == "deleted" else ""
        raise SearchError(f"the tracking store {redact(tracking)} has an experiment {experiment_name(name)!r} "
                          f"already{deleted}, made by another search of that name (another runs folder or "
                          f"another user): names are unique per tracking store; choose another --name")
    if optuna_url.startswith("sqlite:") and not Path(optuna_url.removeprefix("sqlite:///")).exists():
        return  # the search folder's own, new database
    if _study_owner(optuna_url, name) not in (None, search_id):
        raise SearchError(f"the Optuna database {redact(optuna_url)} has a study {name!r} already, made by another "
                          f"search of that name: names are unique per Optuna database; choose another --name")


def check_owned(meta: SearchMeta) -> None:
    """On resume: the experiment and the study of the search's name are still the ones it made."""
    found = _experiment(meta.tracking_uri, meta.name)
    if found is None or found.experiment_id != meta.experiment_id \
            or (meta.search_id and found.tags.get(TAG_SEARCH_ID) != meta.search_id):
        what = "has none" if found is None else f"has one (id {found.experiment_id}) of another search"
        raise SearchError(f"search {meta.name!r} recorded to experiment {meta.experiment_id} "
                          f"({experiment_name(meta.name)}) of {redact(meta.tracking_uri)}, which now {what}: "
                          f"the tracking store was replaced or another search took the name; set "
                          f"MLFLOW_TRACKING_URI to the search's store, or run it again under another --name")
    if meta.search_id is None:
        return  # a search from before ids were recorded
    owner = _study_owner(meta.optuna_storage, meta.study_name)
    if owner != meta.search_id:
        what = "has no study of that name" if owner is None else "has one of another search"
        raise SearchError(f"search {meta.name!r} made study {meta.study_name!r} in {redact(meta.optuna_storage)}, "
                          f"which now {what}: set COMOD_OPTUNA_STORAGE to the search's database, or run it again "
                          f"under another --name")


def check_unchanged(paths: SearchPaths, meta: SearchMeta) -> None:
    """On resume: the search file is the one the search started with, and Ray's version is its version."""
    current = yaml.safe_load(paths.search_file.read_text())
    if meta.search_sha256 is not None and search_hash(current) != meta.search_sha256:
        changed = first_difference(meta.search_settings or {}, current) or "its contents"
        raise SearchError(f"the search file of {meta.name!r} ({paths.search_file}) was edited after the search "
                          f"started ({changed}); a resumed search must sample and score as it started: undo the "
                          f"edit, or run the edited file as a new search (comod search run FILE --name NEW)")
    now = versions()
    started = {p: meta.versions[p] for p in now if meta.versions.get(p) not in (None, now[p])}
    # Ray Tune's state is a pickle of Ray's classes; the stores are versioned databases and comod's state
    # plain files, so other upgrades resume, with a note
    if "ray" in started:
        raise SearchError(f"search {meta.name!r} was started with ray {started['ray']}, and this is ray {now['ray']}: "
                          f"Ray Tune's saved experiment state is read only by the version that wrote it; resume "
                          f"with that version (pip install 'ray[default,tune]=={started['ray']}'), or run the "
                          f"search again under another --name")
    if started:
        changed = ", ".join(f"{p} {v} -> {now[p]}" for p, v in started.items())
        print(f"comod: resuming {meta.name} with other versions than it started with ({changed})",
              file=sys.stderr, flush=True)


def check_cluster(sf, address: str | None, storage: str) -> None:
    """Every node of the (started) Ray cluster must read what the driver writes to ``storage``; a trial's request
    (``search.resources``) must fit on one node: refused at once on a Ray this driver started; said once on a
    cluster (whose autoscaler may add such a node)."""
    try:
        storage_mod.check_shared(storage)
    except storage_mod.StorageError as err:
        raise SearchError(str(err)) from None
    r = sf.search.resources
    wanted = {"CPU": float(r.cpu), "GPU": float(r.gpu)}
    have = [{k: float((n.get("Resources") or {}).get(k, 0.0)) for k in wanted} for n in storage_mod.alive_nodes()]
    if any(all(node[k] >= v for k, v in wanted.items()) for node in have):
        return
    asked = f"{r.cpu:g} CPU and {r.gpu:g} GPU per trial (search.resources)"
    largest = ", ".join(f"{node['CPU']:g} CPU + {node['GPU']:g} GPU" for node in have) or "no live node"
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise SearchError(f"no node can run a trial: it asks {asked}, and this machine's Ray has {largest}; "
                          f"lower search.resources (gpu: 0 on a machine without a GPU), or run the search on a "
                          f"cluster that has such nodes (--address)")
    print(f"comod: no node of the cluster has {asked} now (it has {largest}); the trials wait until the "
          f"cluster's autoscaler adds one", file=sys.stderr, flush=True)
