"""comod's search platform: command line, tracking, search and export.

Imports the core (``comod``) and the ecosystem (MLflow, Ray Tune, Optuna,
pyarrow); the core never imports this package.
"""
__all__ = ["cli", "tracking", "paths"]
