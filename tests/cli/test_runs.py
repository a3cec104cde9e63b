"""Recipe runs: the run directory, the report, resume after kill -9, locks, failures."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from restransfer import cli
from restransfer.cli import runs
from restransfer.cli.config import load_recipe

from conftest import REPO

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def folder_recipe(tmp_path, folder, name="tiny", **extra):
    text = textwrap.dedent(f"""\
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32}}
        data: {{source: {folder}, batch_size: 8, augmentation: light}}
        fine_tune:
          - {{trainable: head, epochs: 2, lr: 0.01, schedule: one_cycle, train_bn: true}}  # as the default's
          - {{trainable: all, epochs: 2, lr: 0.001, schedule: one_cycle, lr_mult: 0.5}}
        training: {{early_stopping_patience: null, deterministic: true}}
        export: {{enabled: false}}
        output_dir: {tmp_path / 'runs'}
        """)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def train_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "restransfer", "train", *args, "--quiet-progress"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_digits_recipe_run_directory_and_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "restransfer", "train", str(REPO / "recipes" / "digits_demo.yaml"),
         "--set", "fine_tune_epochs=2", "--set", f"output_dir={tmp_path}", "--quiet-progress", "--json"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "digits_demo"
    for name in ("recipe.resolved.yaml", "metrics.csv", "model.keras", "metrics.json", "report.html",
                 "checkpoints/state.json", "export/digits/1/saved_model.pb"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["val_accuracy"] > 0.5
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch") and len(rows) == 3  # header + 2 epochs over 2 phases
    # output to a file (not a terminal): one line per epoch, no bar, no TensorFlow start-up noise
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("run " in line and "left" in line for line in epoch_lines), result.stdout
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    for noise in ("cudart", "absl", "cuInit", "cpu_feature_guard"):
        assert noise not in result.stderr, result.stderr[:2000]
    parser = _Images()
    parser.feed((run_dir / "report.html").read_text())
    assert len(parser.sources) >= 5 and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    import base64

    assert base64.b64decode(parser.sources[0].split(",", 1)[1])[:4] == b"\x89PNG"
    again = subprocess.run([sys.executable, "-m", "restransfer", "train", str(REPO / "recipes" / "digits_demo.yaml"),
                            "--set", f"output_dir={tmp_path}"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    # an export killed half-way: a hidden partial directory, no version; --resume redoes
    # only what is missing (training had finished: model.keras is there)
    import shutil

    shutil.rmtree(run_dir / "export" / "digits" / "1")
    (run_dir / "export" / "digits" / ".partial-1-deadbeef" / "variables").mkdir(parents=True)
    trained = (run_dir / "model.keras").stat().st_mtime
    resumed = subprocess.run(
        [sys.executable, "-m", "restransfer", "train", str(REPO / "recipes" / "digits_demo.yaml"),
         "--set", "fine_tune_epochs=2", "--set", f"output_dir={tmp_path}", "--resume"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "model.keras").stat().st_mtime == trained, "training was not redone"
    assert sorted(p.name for p in (run_dir / "export" / "digits").iterdir()) == ["1"]


def test_kill_during_training_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_folder):
    recipe = folder_recipe(tmp_path, tiny_folder / "train")
    straight = train_cli(str(recipe), "--set", "name=straight")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]

    interrupted = train_cli(str(recipe), "--set", "name=killed")
    state = tmp_path / "runs" / "killed" / "checkpoints" / "state.json"
    deadline = time.time() + 600
    while not state.exists() and interrupted.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    saved = json.loads(state.read_text())
    assert saved["epoch"] < 4, "killed before the run ended"
    assert not (tmp_path / "runs" / "killed" / "model.keras").exists()

    resumed = train_cli(str(recipe), "--set", "name=killed", "--resume")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in out
    a = json.loads((tmp_path / "runs" / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "runs" / "killed" / "metrics.json").read_text())
    assert a["val_loss"] == b["val_loss"] and a["val_accuracy"] == b["val_accuracy"]
    from restransfer.tasks.classification import ClassificationRecipe

    load = lambda name: ClassificationRecipe.load(tmp_path / "runs" / name / "model.keras").model.get_weights()
    for w1, w2 in zip(load("straight"), load("killed")):
        np.testing.assert_array_equal(w1, w2)


def test_locked_run_directory_names_the_holder(tmp_path, tiny_folder):
    recipe = folder_recipe(tmp_path, tiny_folder / "train")
    config, _ = load_recipe(recipe)
    run_dir = Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True)
    with runs.RunLock(run_dir):
        with pytest.raises(runs.RunLocked, match=f"PID {os.getpid()}"):
            runs.train(recipe, resume=True)


def test_too_little_disk_is_caught_before_training(tmp_path, tiny_folder, monkeypatch):
    recipe = folder_recipe(tmp_path, tiny_folder / "train")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(OSError, match="only 10 MB free"):
        runs.train(recipe)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_non_finite_loss_stops_with_epoch_and_keeps_last_good_checkpoint(tmp_path):
    import keras
    import tensorflow as tf

    import restransfer as rt
    from restransfer.training.phases import Phase
    from restransfer.training.loop import NonFiniteLoss

    # Inputs turn to NaN from the second epoch on: a stand-in for a diverging run.
    poison = tf.Variable(1.0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((images, np.arange(16) % 2)).batch(8)
    data = data.map(lambda x, y: (x * poison, y))

    class PoisonAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            poison.assign(float("nan"))

    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, num_classes=2,
                                     early_stopping_patience=None,
                                     phases=[Phase("head", epochs=1), Phase("all", epochs=2)])
    with pytest.raises(NonFiniteLoss, match=r"phase 2 \(all\): the loss became NaN/Inf at epoch 2, step 1\..*learning rate"):
        recipe.fit(data, validation_data=None, callbacks=[PoisonAfterFirstEpoch()], verbose=0,
                   checkpoint_dir=tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["epoch"] == 1 and state["phase_complete"]
    assert np.isfinite(keras.saving.load_model(tmp_path / "ckpt" / "last.keras").get_weights()[0]).all()


def test_cli_exit_codes_for_failures(monkeypatch, tmp_path, capsys):
    from restransfer.training.loop import NonFiniteLoss

    def explode(*args, **kwargs):
        raise NonFiniteLoss("phase 1 (head): the loss became NaN/Inf at epoch 1, step 3.")

    monkeypatch.setattr(runs, "train", explode)
    recipe = folder_recipe(tmp_path, tmp_path)
    assert cli.main(["train", str(recipe)]) == 1
    assert "NaN/Inf at epoch 1, step 3" in capsys.readouterr().err


def test_unsafe_model_files_are_refused(tmp_path):
    import keras

    import restransfer as rt

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        rt.ClassificationRecipe.load(tmp_path / "lambda.keras")
    assert cli.main(["predict", str(tmp_path / "lambda.keras"), "x.png"]) == 2


def test_a_recipe_file_and_the_equivalent_python_give_the_same_model(tmp_path, tiny_folder):
    import restransfer as rt
    from restransfer.training.phases import Phase

    recipe_file = folder_recipe(tmp_path, tiny_folder / "train")
    config, _ = load_recipe(recipe_file)
    from_yaml = runs.recipe_from_config(config)
    from_yaml.fit(str(tiny_folder / "train"), verbose=0)
    by_hand = rt.ClassificationRecipe(
        backbone="resnet18", weights=None, image_size=32, batch_size=8, augmentation="light",
        phases=[Phase("head", epochs=2, lr=0.01, schedule="one_cycle", train_bn=True),
                Phase("all", epochs=2, lr=0.001, schedule="one_cycle", lr_mult=0.5)],
        early_stopping_patience=None, deterministic=True, seed=0)
    by_hand.fit(tiny_folder / "train", verbose=0)
    for a, b in zip(from_yaml.model.get_weights(), by_hand.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_medical_cross_validation_reports_clinical_figures_per_fold(tmp_path):
    from conftest import SHARED, require_shared

    require_shared(SHARED / "data" / "brain_mri")
    run_dir = runs.train(REPO / "recipes" / "brain_mri.yaml",
                         ["data.cv_folds=2", "fine_tune_epochs=1", "input.image_size=48",
                          "backbone.weights=null", "medical.gradcam_images=2", f"output_dir={tmp_path}"],
                         verbose=0)
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    for key in ("test_auc", "test_sensitivity", "test_specificity", "test_accuracy"):
        assert 0 <= summary[key]["mean"] <= 1 and summary[key]["sd"] >= 0
    clinical = json.loads((run_dir / "fold1" / "clinical.json").read_text())
    assert 0 < clinical["binary"]["threshold"] < 1 and "ci95" in clinical["binary"]
    assert len(list((run_dir / "fold1" / "gradcam").glob("*.png"))) == 2
    assert (run_dir / "fold1" / "report.html").read_text().count('alt="Grad-CAM') == 2
    index = (run_dir / "report.html").read_text()  # the run's page: per-fold table, mean ± sd, links
    assert "mean ± sd" in index and 'href="fold2/report.html"' in index
