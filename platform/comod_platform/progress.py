"""Terminal progress for one experiment, and per-epoch metrics to MLflow."""
from __future__ import annotations

import sys

from tqdm import tqdm

from comod.train import Callbacks


class ProgressCallbacks(Callbacks):
    """A tqdm bar per phase; each epoch's metrics to the run logger and one line to the terminal."""

    def __init__(self, logger, enabled: bool = True):
        # a learning-curve point (on_eval) goes to MLflow only, the bar goes on
        super().__init__(on_epoch=self._epoch, on_step=self._step, on_phase=self._phase,
                         on_eval=lambda phase, step, metrics: logger.log_metrics(metrics, step))
        self.logger, self.disable = logger, None if enabled else True  # None: a bar only on a terminal
        self.bar: tqdm | None = None
        self.epochs = 0

    def _phase(self, phase: str, first_epoch: int, epochs: int) -> None:
        self.epochs = epochs
        if epochs == 0:
            print(f"{phase}: nothing to train (no trainable parameters or 0 epochs)", file=sys.stderr)
        elif first_epoch:
            print(f"{phase}: resuming after epoch {first_epoch}/{epochs}", file=sys.stderr)

    def _step(self, phase: str, step: int, steps: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=steps, desc=phase, unit="step", leave=False, dynamic_ncols=True, disable=self.disable)
        self.bar.update(1)

    def _epoch(self, phase: str, epoch: int, step: int, metrics: dict) -> None:
        self.close()
        self.logger.log_metrics(metrics, step)
        shown = ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items())
        print(f"{phase} epoch {epoch}/{self.epochs}: {shown}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
