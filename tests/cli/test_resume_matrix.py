"""Resume after ``kill -9`` is exact in every kind of phase, and a recipe file trains the model
its Python equivalent trains.

A real ``restransfer train`` is killed just after the first epoch of each phase in turn from
the second (resumed, killed again in the next phase, ...) and finishes; its final weights and every
epoch's figures must equal, bit for bit (deterministic mode), those of the same recipe written
by hand in Python and fitted here, uninterrupted. The phases cover every kind:

* cell 1: a head phase on cached, augmented features (``cache_views`` >= its epochs: exact), first;
* cell 2: the default plan's head phase: augmented, the frozen backbone's BatchNorm training;
* cell 3: a full phase with AdamW + weight decay, MixUp, EMA and early stopping (patience 1);
* cell 4: a cached head phase after a full phase.

The Python reference (``BY_HAND``, the same phases written as Phase objects) must stay the
recipe file's twin: ``PHASES`` writes the file's ``fine_tune``. One kill chain and one reference instead of one uninterrupted run per cell keeps
the suite's time down; each epoch is compared, so a failure names the cell whose resume (or
whose YAML -> Python mapping) went wrong.
"""

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from restransfer.training.phases import Phase

from conftest import REPO, write_image
from test_runs import ENV, train_cli

CELLS = ["cached head phase (first)", "augmented head phase with BatchNorm training (the default's)",
         "full phase: AdamW + weight decay, MixUp, EMA, early stopping",
         "cached head phase (after a full phase)"]
PHASES = [
    Phase("head", epochs=2, lr=0.01),
    Phase("head", epochs=2, lr=0.01, schedule="one_cycle", train_bn=True),
    Phase("all", epochs=2, lr=0.002, optimizer="adamw", weight_decay=0.05, mixup=0.4, ema=True),
    Phase("head", epochs=2, lr=0.005),
]


def _state(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _kill_in_phase(process, state_file, phase):
    """SIGKILL as soon as the checkpoint says an epoch of ``phase`` is done (phase not finished)."""
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        state = _state(state_file)
        if state and state["phase"] == phase and not state["phase_complete"]:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = _state(state_file)
    assert state and state["phase"] == phase and not state["phase_complete"], f"not killed inside {CELLS[phase]}: {state}"
    return state


def test_kill_inside_each_kind_of_phase_then_resume_equals_the_same_recipe_in_python(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for label, (low, high) in (("bright", (150, 255)), ("dark", (0, 105))):
            for i in range(count):
                pixels = rng.integers(low, high, (int(rng.integers(24, 40)), 36, 3), dtype=np.uint8)
                write_image(tmp_path / "data" / split / label / f"{label}{i}{'.png' if i % 2 else '.jpg'}", pixels)
    written = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in p.model_dump(exclude_defaults=True).items()) + "}"
                        for p in PHASES)
    recipe = tmp_path / "every_phase.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32}}
        data: {{source: {tmp_path / 'data'}, batch_size: 8, augmentation: light}}
        fine_tune: [{written}]
        training: {{early_stopping_patience: 1, deterministic: true, cache_features: true, cache_views: 2}}
        export: {{enabled: false}}
        output_dir: {tmp_path / 'runs'}
        """))
    # the same recipe by hand in Python, uninterrupted, in a process of its own running beside the kills
    reference = subprocess.Popen([sys.executable, "-c", BY_HAND, str(tmp_path)], cwd=REPO, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "killed"
    state_file = run_dir / "checkpoints" / "state.json"
    process = train_cli(str(recipe), "--set", "name=killed")
    for phase in range(1, len(CELLS)):  # cell 1 resumes as cell 4 does (a cached head phase): it is not killed
        _kill_in_phase(process, state_file, phase)
        assert not (run_dir / "model.keras").exists()
        process = train_cli(str(recipe), "--set", "name=killed", "--resume")
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    assert "resuming from" in out

    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err[-3000:]

    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = json.loads((tmp_path / "by_hand.json").read_text())
    history, starts = expected["history"], expected["phase_starts"]
    assert [int(row["epoch"]) for row in rows] == list(range(len(history["loss"])))
    for row in rows:
        epoch = int(row["epoch"])
        phase = max(i for i, start in enumerate(starts) if start <= epoch)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert float(row[key]) == history[key][epoch], \
                f"epoch {epoch + 1} {key} differs in '{CELLS[phase]}': {row[key]} vs {history[key][epoch]}"
    from restransfer.tasks.classification import ClassificationRecipe

    killed = ClassificationRecipe.load(run_dir / "model.keras").model.get_weights()
    by_hand = np.load(tmp_path / "by_hand.npz")
    for index, weight in enumerate(killed):
        np.testing.assert_array_equal(by_hand[f"arr_{index}"], weight)
    figures = json.loads((run_dir / "metrics.json").read_text())
    assert figures["val_accuracy"] == expected["val"]["accuracy"] and figures["val_loss"] == expected["val"]["loss"]


BY_HAND = """
import json, sys
from pathlib import Path
import numpy as np
import restransfer as rt
from restransfer import Phase
out = Path(sys.argv[1])
recipe = rt.ClassificationRecipe(
    backbone="resnet18", weights=None, image_size=32, batch_size=8, augmentation="light",
    phases=[Phase("head", epochs=2, lr=0.01),
            Phase("head", epochs=2, lr=0.01, schedule="one_cycle", train_bn=True),
            Phase("all", epochs=2, lr=0.002, optimizer="adamw", weight_decay=0.05, mixup=0.4, ema=True),
            Phase("head", epochs=2, lr=0.005)],
    early_stopping_patience=1, deterministic=True, cache_features=True, cache_views=2, seed=0)
history = recipe.fit(str(out / "data"), verbose=0)
np.savez(out / "by_hand.npz", *recipe.model.get_weights())
(out / "by_hand.json").write_text(json.dumps({"history": history.history, "phase_starts": history.phase_starts,
                                              "val": recipe.evaluate(str(out / "data" / "val"))}))
"""
