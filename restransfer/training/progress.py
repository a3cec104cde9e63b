"""What a person watching a run sees: a live Keras bar on a terminal, one line per epoch in a
log file, and where the whole run stands (epoch k of n, fold, elapsed, estimated time left).

``verbose="auto"`` picks the bar on a terminal or in a notebook and lines otherwise (CI,
``nohup``, SLURM), so a log file never fills with a bar's carriage returns and escape codes.
"""

from __future__ import annotations

import sys
import time

import keras

BAR, LINES, SILENT = "bar", "lines", "silent"


def progress_mode(verbose) -> str:
    """Keras-style ``verbose`` ("auto", 0, 1, 2, or a mode name) -> bar / lines / silent."""
    if verbose in (BAR, LINES, SILENT):
        return verbose
    if verbose == "auto":
        interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
        return BAR if interactive else LINES
    return {0: SILENT, 1: BAR, 2: LINES}.get(verbose, LINES)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class RunProgress(keras.callbacks.Callback):
    """After every epoch, one line: the epoch's metrics (in ``lines`` mode, where Keras is
    silent) and the run's progress: epoch k of the planned total, the fold, time elapsed and
    an estimate of the time left (planned epochs; early stopping can only shorten it).

    One instance can follow several fits (phases, cross-validation folds): ``planned`` is
    the whole run's epoch count and ``label`` says where the run is (e.g. "fold 2/5")."""

    def __init__(self, planned: int, mode: str = LINES, label: str = "", stream=None):
        super().__init__()
        self.planned, self.mode, self.label = max(int(planned), 1), mode, label
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = time.monotonic()
        self._epoch_started = self.started

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.mode == SILENT:
            return
        self.done += 1
        now = time.monotonic()
        elapsed = now - self.started
        left = elapsed / self.done * max(self.planned - self.done, 0)
        parts = [f"epoch {epoch + 1}"]
        if self.mode == LINES:
            parts += [f"{key} {value:.4g}" for key, value in (logs or {}).items()
                      if isinstance(value, (int, float)) and key != "learning_rate"]
            parts.append(f"{now - self._epoch_started:.0f}s")
        where = f"run {self.done}/{self.planned} epochs" + (f", {self.label}" if self.label else "")
        parts.append(f"{where}, {_clock(elapsed)} elapsed, ~{_clock(left)} left")
        print(" · ".join(parts), file=self.stream, flush=True)
