"""Checkpoints that let an interrupted run continue exactly where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np


STATE_ENTRY = "restransfer_state.json"  # inside last.keras: the model and its state are one file


def read_state(directory) -> dict | None:
    """The training state of the checkpoint in ``directory`` (None when there is none): the
    copy inside ``last.keras``, which is always the model's own (``state.json`` beside it is
    for people and may lag it by an epoch after a kill)."""
    import zipfile

    model_path = Path(directory) / "last.keras"
    if not model_path.is_file():
        return None
    with zipfile.ZipFile(model_path) as archive:
        if STATE_ENTRY in archive.namelist():
            return json.loads(archive.read(STATE_ENTRY))
    legacy = Path(directory) / "state.json"  # a checkpoint written before the state moved inside
    return json.loads(legacy.read_text()) if legacy.is_file() else None


class Checkpointer:
    """Saves the model (with optimizer, schedule step and RNG state) and where training
    stands after every epoch, so an interrupted run continues where it stopped.

    A checkpoint is one file: ``last.keras`` holds the model and, as an extra zip entry, the
    training state; it is written under a temporary name and renamed, so a kill at any moment
    leaves the previous epoch's model with the previous epoch's state. ``state.json`` beside
    it is a readable copy written afterwards. Early stopping's best weights are written
    before the checkpoint that names them and removed only after one that names another.

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
        import zipfile

        temporary = self.directory / ".last.keras.partial.keras"
        model.save(temporary)
        with zipfile.ZipFile(temporary, "a") as archive:
            archive.writestr(STATE_ENTRY, json.dumps(state))
        os.replace(temporary, self.model_path)  # model and state arrive together
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
        state = read_state(self.directory)
        if state is None:
            return None, None
        model = keras.saving.load_model(self.model_path, safe_mode=True)
        for key, variable in self._random_states(model).items():
            if key in state.get("rng", {}):
                variable.assign(np.asarray(state["rng"][key], dtype=variable.dtype))
        return model, state
