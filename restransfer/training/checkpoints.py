"""Checkpoints that let an interrupted run continue exactly where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np


class Checkpointer:
    """Saves the model (with optimizer, schedule step and RNG state) and where training
    stands after every epoch, so an interrupted run continues where it stopped.

    ``last.keras`` and ``state.json`` are each written to a temporary file and renamed, and
    the state is written after the model, so the state never points past the model.

    In multi-worker training every worker reads the checkpoint (the directory must be on a
    file system they share) and only the chief (``writer=True``) writes it.
    """

    def __init__(self, directory, writer: bool = True):
        self.directory = Path(directory)
        self.writer = writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.model_path = self.directory / "last.keras"
        self.state_path = self.directory / "state.json"

    @staticmethod
    def _random_states(model) -> dict:
        """The state of every random layer (Dropout, MixUp, ...): the model's variables that
        are not weights. Keras does not restore them from a .keras file."""
        weights = {id(w) for w in model.weights}
        return {f"{index}:{v.path}": v for index, v in enumerate(model.variables) if id(v) not in weights}

    def save(self, model, state: dict, best_weights: list | None = None) -> None:
        """``best_weights``: early stopping's newly best weights (written beside, named by
        epoch, so the state never names a file from a later epoch)."""
        if not self.writer:
            return
        state = {**state, "rng": {key: np.asarray(v.value).tolist()
                                  for key, v in self._random_states(model).items()}}
        stopping = state.get("early_stopping")
        if best_weights is not None and stopping:
            temporary = self.directory / ".best.partial.npz"
            np.savez(temporary, *best_weights)
            os.replace(temporary, self.directory / stopping["best_weights_file"])
        temporary = self.directory / ".last.keras.partial.keras"
        model.save(temporary)
        os.replace(temporary, self.model_path)
        temporary_state = self.directory / ".state.json.partial"
        temporary_state.write_text(json.dumps(state))
        os.replace(temporary_state, self.state_path)
        keep = stopping["best_weights_file"] if stopping else None
        for old in self.directory.glob("best-*.npz"):
            if old.name != keep:
                old.unlink()

    def best_weights(self, state: dict) -> list | None:
        """The best weights an interrupted phase's early stopping had kept."""
        stopping = state.get("early_stopping")
        if not stopping or not stopping.get("best_weights_file"):
            return None
        with np.load(self.directory / stopping["best_weights_file"], allow_pickle=False) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def load(self):
        """(model, state) of the last complete epoch, or (None, None)."""
        if not (self.model_path.is_file() and self.state_path.is_file()):
            return None, None
        state = json.loads(self.state_path.read_text())
        model = keras.saving.load_model(self.model_path, safe_mode=True)
        for key, variable in self._random_states(model).items():
            if key in state.get("rng", {}):
                variable.assign(np.asarray(state["rng"][key], dtype=variable.dtype))
        return model, state
