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

from conftest import REPO, cli_in_fresh_process

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


def test_digits_recipe_run_directory_report_ctrl_c_and_resume(tmp_path):
    """recipes/digits_demo.yaml (the offline default) through the CLI: Ctrl-C after the first
    epoch says one line with the exact --resume command; the resumed run counts its epochs on,
    writes the whole run directory and its report; a second start is refused; an export
    killed half-way is redone by --resume without retraining; and --resume of a finished run
    says it is complete."""
    recipe = str(REPO / "recipes" / "digits_demo.yaml")
    settings = ["--set", "fine_tune_epochs=2", "--set", "data.val_fraction=0.5", "--set", f"output_dir={tmp_path}"]
    run_dir = tmp_path / "digits_demo"
    interrupted = train_cli(recipe, *settings)
    state = run_dir / "checkpoints" / "state.json"
    deadline = time.time() + 600
    while not state.exists() and interrupted.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert "holds the last complete epoch" in lines[0] and \
        f"continue with: restransfer train {recipe} {' '.join(settings)} --resume" in lines[0]

    result = subprocess.run([sys.executable, "-m", "restransfer", "train", recipe, *settings, "--resume",
                             "--quiet-progress", "--json"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("recipe.resolved.yaml", "metrics.csv", "model.keras", "metrics.json", "report.html",
                 "checkpoints/state.json", "export/digits/1/saved_model.pb", ".restransfer-run"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["val_accuracy"] > 0.5
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch") and len(rows) == 3  # header + 2 epochs over 2 phases, each once
    # output to a file (not a terminal): one line per epoch, no bar, no TensorFlow start-up noise;
    # the run's count goes on from the epoch the interrupted run had done
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 1 and "run 2/2 epochs" in epoch_lines[0] and "left" in epoch_lines[0], result.stdout
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    for noise in ("cudart", "absl", "cuInit", "cpu_feature_guard"):
        assert noise not in result.stderr, result.stderr[:2000]
    parser = _Images()
    parser.feed((run_dir / "report.html").read_text())
    assert len(parser.sources) >= 5 and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    import base64

    assert base64.b64decode(parser.sources[0].split(",", 1)[1])[:4] == b"\x89PNG"
    again = subprocess.run([sys.executable, "-m", "restransfer", "train", recipe, "--set", f"output_dir={tmp_path}"],
                           cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    # an export killed half-way: a hidden partial directory, no version; --resume redoes
    # only what is missing (training had finished: model.keras is there)
    import shutil

    shutil.rmtree(run_dir / "export" / "digits" / "1")
    (run_dir / "export" / "digits" / ".partial-1-deadbeef" / "variables").mkdir(parents=True)
    trained = (run_dir / "model.keras").stat().st_mtime
    # (the CLI's code in this process: a subprocess would add a TensorFlow start, nothing more)
    assert cli.main(["train", recipe, *settings, "--resume", "--quiet-progress"]) == 0
    assert (run_dir / "model.keras").stat().st_mtime == trained, "training was not redone"
    assert sorted(p.name for p in (run_dir / "export" / "digits").iterdir()) == ["1"]
    # a finished run is recognised from its files: nothing in it is redone or rewritten (a time
    # bound stood here, and failed on a loaded 2-core machine where TensorFlow's import alone took 20 s)
    written = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    code, tensorflow_loaded, _, complete = cli_in_fresh_process(["train", recipe, *settings, "--resume"], env=ENV)
    assert (code, tensorflow_loaded) == (0, False), complete.stdout + complete.stderr[-2000:]
    assert "is complete" in complete.stdout, "said before TensorFlow loads"
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == written, "a finished run is not redone"


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


@pytest.mark.parametrize("trainable", ["all", "stage4"])
def test_non_finite_loss_stops_with_epoch_and_keeps_last_good_checkpoint(tmp_path, trainable):
    """Also where frozen stages' BatchNorm layers run in inference mode ("stage4"): there oneDNN's
    fused BatchNorm + ReLU turns a NaN into 0, which had left the loss finite."""
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
                                     phases=[Phase("head", epochs=1), Phase(trainable, epochs=2)])
    with pytest.raises(NonFiniteLoss, match=rf"phase 2 \({trainable}\): the loss became NaN/Inf at epoch 2, step 1\..*learning rate"):
        recipe.fit(data, validation_data=None, callbacks=[PoisonAfterFirstEpoch()], verbose=0,
                   checkpoint_dir=tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["epoch"] == 1 and state["phase_complete"]
    assert np.isfinite(keras.saving.load_model(tmp_path / "ckpt" / "last.keras").get_weights()[0]).all()


def test_cli_exit_codes_for_failures(monkeypatch, tmp_path, tiny_folder, capsys):
    from restransfer.training.loop import NonFiniteLoss

    def explode(*args, **kwargs):
        raise NonFiniteLoss("phase 1 (head): the loss became NaN/Inf at epoch 1, step 3.")

    monkeypatch.setattr(runs, "train", explode)
    recipe = folder_recipe(tmp_path, tiny_folder)
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
