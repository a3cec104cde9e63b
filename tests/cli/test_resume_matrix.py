"""Resume after ``kill -9`` is exact in every kind of phase. A real ``restransfer train`` is
killed just after the first epoch of each phase in turn (resumed, killed again in the next
phase, ...), and the final weights, ``metrics.csv`` and ``metrics.json`` must equal an
uninterrupted run's (deterministic mode). The recipe has no augmentation, so its head phases
train on cached features:

* cell 1: a cached head phase, first;
* cell 2: a full phase with AdamW + weight decay, MixUp, EMA and early stopping (patience 1);
* cell 3: a cached head phase after a full phase.

An augmented head phase whose BatchNorm trains (the default plan's, ``train_bn``) is the cell
of ``test_runs.py::test_kill_during_training_then_resume_matches_an_uninterrupted_run``. One
kill chain instead of one run per cell keeps the suite's time down; ``metrics.csv`` is
compared row by row, so a failure names the cell (the phase) whose resume went wrong.
"""

import json
import signal
import textwrap
import time

import numpy as np

from conftest import write_image
from test_runs import train_cli

CELLS = ["cached head phase (first)", "full phase: AdamW + weight decay, MixUp, EMA, early stopping",
         "cached head phase (after a full phase)"]
PHASES = ("[{trainable: head, epochs: 2, lr: 0.01}, "
          "{trainable: all, epochs: 3, lr: 0.002, optimizer: adamw, weight_decay: 0.05, mixup: 0.4, ema: true}, "
          "{trainable: head, epochs: 2, lr: 0.005}]")


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


def test_kill_inside_each_kind_of_phase_then_resume_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for label, (low, high) in (("bright", (150, 255)), ("dark", (0, 105))):
            for i in range(count):
                pixels = rng.integers(low, high, (int(rng.integers(24, 40)), 36, 3), dtype=np.uint8)
                write_image(tmp_path / "data" / split / label / f"{label}{i}{'.png' if i % 2 else '.jpg'}", pixels)
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32}}
        data: {{source: {tmp_path / 'data'}, batch_size: 8, augmentation: none}}
        fine_tune: {PHASES}
        training: {{early_stopping_patience: 1, deterministic: true}}
        export: {{enabled: false}}
        output_dir: {tmp_path / 'runs'}
        """))
    straight = train_cli(str(recipe), "--set", "name=straight")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]

    run_dir = tmp_path / "runs" / "killed"
    state_file = run_dir / "checkpoints" / "state.json"
    kills = []
    process = train_cli(str(recipe), "--set", "name=killed")
    for phase in range(len(CELLS)):
        kills.append(_kill_in_phase(process, state_file, phase))
        assert not (run_dir / "model.keras").exists()
        process = train_cli(str(recipe), "--set", "name=killed", "--resume")
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    assert "resuming from" in out

    straight_dir = tmp_path / "runs" / "straight"
    expected = (straight_dir / "metrics.csv").read_text().splitlines()
    got = (run_dir / "metrics.csv").read_text().splitlines()
    phase_starts = json.loads((straight_dir / "checkpoints" / "state.json").read_text())["history"]["phase_starts"]
    for row, (a, b) in enumerate(zip(expected, got)):
        epoch = row - 1  # row 0 is the header
        phase = max(i for i, start in enumerate(phase_starts) if start <= max(epoch, 0))
        assert a == b, f"epoch {epoch + 1} differs after a kill in '{CELLS[phase]}':\n{a}\n{b}"
    assert len(expected) == len(got)
    a = json.loads((straight_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["val_loss"] == b["val_loss"] and a["val_accuracy"] == b["val_accuracy"]
    from restransfer.tasks.classification import ClassificationRecipe

    weights = [ClassificationRecipe.load(d / "model.keras").model.get_weights() for d in (straight_dir, run_dir)]
    for w1, w2 in zip(*weights):
        np.testing.assert_array_equal(w1, w2)
