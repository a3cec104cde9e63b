"""Cross-validation through the CLI: per-fold clinical figures and reports, and resume fold by fold."""

import json
import signal
import time

from conftest import REPO
from test_runs import train_cli


def test_medical_cross_validation_reports_per_fold_and_resumes_fold_by_fold(tmp_path):
    """recipes/brain_mri.yaml (2 folds, small, 72 of its images): killed (kill -9) inside fold 2,
    resumed: fold 1 is read back, not retrained, fold 2 continues from its last epoch and logs each epoch once;
    then each fold has its clinical figures and Grad-CAM, and the run page the mean +- sd.
    A --resume of the finished run retrains nothing."""
    from conftest import SHARED, require_shared

    import shutil

    source = require_shared(SHARED / "data" / "brain_mri")
    # 36 real files of each class (of 98 and 155): what is checked is the folds, not the figures,
    # and the data's decoding is most of the run's time
    subset = tmp_path / "brain_mri"
    for label in ("no_tumor", "tumor"):
        (subset / label).mkdir(parents=True)
        for path in sorted((source / label).iterdir())[:36]:
            shutil.copy(path, subset / label / path.name)
    overrides = [f"data.source={subset}", "data.cv_folds=2", "fine_tune=[{trainable: all, epochs: 2, lr: 0.002}]",
                 "input.image_size=32",
                 "backbone.weights=null", "medical.gradcam_images=1", f"output_dir={tmp_path / 'runs'}"]
    settings = [arg for item in overrides for arg in ("--set", item)]
    recipe = str(REPO / "recipes" / "brain_mri.yaml")
    run_dir = tmp_path / "runs" / "brain_mri"
    fold2_state = run_dir / "fold2" / "checkpoints" / "state.json"
    process = train_cli(recipe, *settings)
    deadline = time.time() + 600
    while not fold2_state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert fold2_state.exists(), process.stderr.read()[-3000:]
    fold1 = {name: (run_dir / "fold1" / name).stat().st_mtime_ns for name in ("model.keras", "metrics.json")}

    resumed = train_cli(recipe, *settings, "--resume")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert "fold 1 was finished" in out and "resuming from" in out
    assert {name: (run_dir / "fold1" / name).stat().st_mtime_ns for name in fold1} == fold1
    for fold in (1, 2):
        epochs = [int(line.split(",")[0]) for line in (run_dir / f"metrics_fold{fold}.csv").read_text().splitlines()[1:]]
        assert epochs == sorted(set(epochs)) == list(range(len(epochs))) and epochs, (fold, epochs)

    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    for key in ("test_auc", "test_sensitivity", "test_specificity", "test_accuracy"):
        assert 0 <= summary[key]["mean"] <= 1 and summary[key]["sd"] >= 0
    clinical = json.loads((run_dir / "fold1" / "clinical.json").read_text())
    assert 0 < clinical["binary"]["threshold"] < 1 and "ci95" in clinical["binary"]
    assert len(list((run_dir / "fold1" / "gradcam").glob("*.png"))) == 1
    assert (run_dir / "fold1" / "report.html").read_text().count('alt="Grad-CAM') == 1
    index = (run_dir / "report.html").read_text()  # the run's page: per-fold table, mean ± sd, links
    assert "mean ± sd" in index and 'href="fold2/report.html"' in index

    models = {fold: (run_dir / f"fold{fold}" / "model.keras").stat().st_mtime_ns for fold in (1, 2)}
    again = train_cli(recipe, *settings, "--resume")
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    assert "is complete" in out
    assert {fold: (run_dir / f"fold{fold}" / "model.keras").stat().st_mtime_ns for fold in (1, 2)} == models
