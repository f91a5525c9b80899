"""comod's search platform: the ``comod`` command, search, tracking, export and compare, on Ray Tune,
Optuna, MLflow, pyarrow and matplotlib. The core (``comod``) never imports it. Imports run one way, at most
8 modules deep (tests/comod_platform/test_platform_import.py checks depth and that there is no circle):

    cli -> cli_search -> runner | jobs | export | compare | dashboard
    runner -> preflight, tuner, summary, searcher, tracking, sqlite_stores, storage
    tuner -> trainable (one trial: plots, watchdog), searcher (Optuna ask and tell), compat (the one private
             use), tune_callbacks -> trial_runs -> tracking -> writer
    compare -> conditions, curves, stats, importances, report, compare_plots -> results
    results, export, jobs -> search_state, searchfile, conventions (names shared by trials and driver); jobs -> wheel
    leaves: conventions, errors, paths, credentials, writer, interrupts, watchdog, own_session, progress, plots

Where to add a mechanism, a sampler, a scheduler, a logged value, a setting or a command: docs/architecture.md.
"""
__all__ = ["cli", "tracking", "paths"]
