"""comod's search platform: command line, tracking, search and export.

Imports the core (``comod``) and the ecosystem (MLflow, Ray Tune, Optuna,
pyarrow); the core never imports this package.

Imports run one way, down these layers (a module may import its own layer's
modules where an arrow says so, and any layer below), with no circle:

1. ``cli``: the ``comod`` console script; ``comod train`` and ``comod ui`` are
   its own, the rest it takes from
2. ``cli_search``: the search commands (``comod search|export|compare|
   dashboard``): their arguments, and the handlers that call
3. the operations: ``runner`` (run and resume a search), ``jobs`` (a search as
   a Ray job on a cluster; -> ``runner``), ``export`` and ``compare``
   (-> ``results``, a search's trials read back from MLflow; compare also ->
   ``conditions``, ``stats``, ``curves``, ``importances`` (-> ``dashboard``
   to read the Optuna study), ``report`` and ``compare_plots``),
   ``dashboard`` (optuna-dashboard);
4. the machinery: ``trainable`` (one trial on a Ray worker; -> ``plots``,
   ``search_state``), ``tune_callbacks`` (the Ray adapter; -> ``trial_runs``,
   the runs' bookkeeping, -> ``tracking``, MLflow), ``sqlite_stores`` (the runs
   folder's SQLite databases in WAL mode, for the driver; -> ``paths``),
   ``searcher`` (Optuna in Ray Tune), ``study_storage`` (the study written
   behind), ``searchfile``,
   ``search_state`` (a search's folder), ``storage`` (Ray Tune's), ``plots``
   (a run's plots), ``progress`` (``comod train``'s terminal);
5. the leaves, which import no module of the package: ``conventions`` (the
   trial-to-driver protocol: metric and tag names, trial states, which value
   is better for a mode), ``errors``, ``paths``, ``credentials``, ``writer``,
   ``interrupts``, ``reporter``, ``watchdog``;
6. ``comod``, the core.

No module below the command layer imports ``cli`` or ``cli_search``;
tests/comod_platform/test_platform_import.py checks that, and that the
imports have no circle.

Where to add:

- a mechanism kind, a dataset or a backbone: in the core (``comod``'s package
  docstring says where); a search space reaches the new choice by its dotted
  path, with no platform code;
- a plot of each trial: a figure in ``plots.plot_run`` (matplotlib, PNG); the
  MLflow adapter logs every file in the checkpoint's ``plots/``;
- a sampler: a line in ``searcher.SAMPLERS`` (name -> a function of the
  seed) and its name in the choices of ``searchfile.SearchSettings.sampler``;
- a scheduler: its settings in ``searchfile.Scheduler`` (``type`` names it)
  and how Ray Tune's is built from them in ``runner._scheduler``; whether it
  stops trials early is told to the searcher in ``runner._tuner``
  (``report_intermediate``);
- a thing MLflow logs: for a search's trials, ``trainable`` reports it to Ray
  Tune (names shared with the driver in ``conventions``), and
  tune_callbacks.py (the Ray adapter) and trial_runs.py (the runs'
  bookkeeping) log it; for ``comod train``, ``tracking.RunLogger``.
- a search-file setting: a field, with its docstring and its ``validate``
  check, in ``searchfile`` (``SearchSettings`` and the classes it holds); what
  it does goes in the module that uses it, mostly ``runner``;
- a CLI command: a search command in ``cli_search.add_commands`` with its
  ``cmd_*`` handler, which calls an operation and turns its errors into
  ``errors.UserError`` (one line and an exit status); any other in ``cli``.
"""
__all__ = ["cli", "tracking", "paths"]
