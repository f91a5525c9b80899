"""``comod dashboard N``: optuna-dashboard (the ``dashboard`` extra) on a search's Optuna study, served on
127.0.0.1 until Ctrl-C or SIGTERM, which free the port."""
from __future__ import annotations

import signal
import sys
from contextlib import suppress
from pathlib import Path

from comod_platform.credentials import redact

HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class DashboardError(RuntimeError):
    """The dashboard cannot be served; the message says why and what to do."""


def _first_line(err: Exception) -> str:
    return (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0][:300]


def open_study_storage(url: str, study_name: str, search: str):
    """(Optuna storage, study id) of the search's study; DashboardError when the database (never made here)
    or the study is not there."""
    import optuna

    shown = redact(url)
    if url.startswith("sqlite:///") and not (path := Path(url[len("sqlite:///"):])).is_file():
        raise DashboardError(f"search {search!r} has no Optuna database at {path}; its folder is incomplete, "
                             f"or the study lives elsewhere (COMOD_OPTUNA_STORAGE when it ran)")
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    except ModuleNotFoundError as err:
        raise DashboardError(f"the Optuna storage {shown} of search {search!r} needs the driver {err.name}: "
                             f"pip install 'comod[cluster]'") from None
    except Exception as err:  # noqa: BLE001 - a database that does not answer, a bad URL
        raise DashboardError(f"cannot open the Optuna storage {shown} of search {search!r}: {_first_line(err)}") \
            from None
    try:
        return storage, storage.get_study_id_from_name(study_name)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()][:8]
        raise DashboardError(f"the Optuna storage {shown} holds no study {study_name!r} (search {search!r}); "
                             f"it holds: {', '.join(names) or 'no study'}") from None
    except Exception as err:  # noqa: BLE001 - e.g. a SQLite file that is not Optuna's
        raise DashboardError(f"cannot read study {study_name!r} from {shown}: {_first_line(err)}") from None


def serve(name: str, port: int = DEFAULT_PORT) -> int:
    """Serve optuna-dashboard for search ``name`` until Ctrl-C or SIGTERM; returns 0 once stopped."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from comod_platform.search_state import SearchPaths

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # a browser's open connection never holds up the stop

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - no access log on the terminal
            pass

    meta = SearchPaths(name).read_meta()
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError("comod dashboard needs optuna-dashboard, which is not installed: pip install "
                             "'comod[dashboard]' (in this checkout: .venv/bin/pip install optuna-dashboard)") from None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, study_id = open_study_storage(meta.optuna_storage, meta.study_name, name)
    try:
        httpd = make_server(HOST, port, optuna_dashboard.wsgi(storage), server_class=Server,
                            handler_class=QuietHandler)
    except OSError as err:
        raise DashboardError(f"cannot listen on {HOST}:{port} ({err.strerror or err}); another program (another "
                             f"dashboard?) uses that port: choose another with --port") from None
    print(f"Optuna dashboard of search {name} (study {meta.study_name} in {redact(meta.optuna_storage)}) on "
          f"http://{HOST}:{port}/dashboard/studies/{study_id}; Ctrl-C stops it", flush=True)

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        with suppress(KeyboardInterrupt):
            httpd.serve_forever(poll_interval=0.25)
    finally:
        signal.signal(signal.SIGTERM, previous)
        httpd.server_close()
        storage.engine.dispose()
    print(f"comod: dashboard of search {name} stopped", file=sys.stderr, flush=True)
    return 0
