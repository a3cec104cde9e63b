"""A segmentation recipe file through the CLI: kill -9 and resume (bit for bit its Python
twin), the export's masks checked against predict_masks, and `restransfer predict` writing masks."""

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np

from conftest import REPO
from test_resume_matrix import _kill_in_phase
from test_runs import ENV, train_cli


SEGMENTATION_BY_HAND = """
import json, sys
from pathlib import Path
import numpy as np
from restransfer import Phase, SegmentationRecipe
out = Path(sys.argv[1])
recipe = SegmentationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=4,
                            class_names=["background", "lesion"], decoder_widths=(16, 16, 8, 8, 8),
                            phases=[Phase("head", epochs=2, lr=0.01, schedule="one_cycle", train_bn=True),
                                    Phase("all", epochs=2, lr=0.002, schedule="one_cycle", lr_mult=0.5)],
                            early_stopping_patience=None, deterministic=True, seed=0)
history = recipe.fit(str(out / "pairs"), verbose=0)
np.savez(out / "by_hand.npz", *recipe.model.get_weights())
(out / "by_hand.json").write_text(json.dumps({"history": history.history}))
"""


def test_a_segmentation_recipe_file_killed_and_resumed_equals_its_python_twin_and_serves(tmp_path):
    """task: segmentation through the CLI: kill -9 inside the second phase, --resume, then bit
    for bit the model of the same recipe written in Python; the run exports (its masks checked
    against predict_masks on original files). (`restransfer predict` writing masks:
    tests/tasks/test_segmentation.py.)"""
    from conftest import write_pairs

    from restransfer import load

    folder = write_pairs(tmp_path / "pairs", 9, 3, 2, seed=7)
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        task: segmentation
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32}}
        data: {{source: {folder}, batch_size: 4}}
        fine_tune:
          - {{trainable: head, epochs: 2, lr: 0.01, schedule: one_cycle, train_bn: true}}
          - {{trainable: all, epochs: 2, lr: 0.002, schedule: one_cycle, lr_mult: 0.5}}
        segmentation: {{classes: [background, lesion], decoder_widths: [16, 16, 8, 8, 8]}}
        training: {{early_stopping_patience: null, deterministic: true}}
        export: {{model_name: seg}}
        output_dir: {tmp_path / 'runs'}
        """))
    reference = subprocess.Popen([sys.executable, "-c", SEGMENTATION_BY_HAND, str(tmp_path)], cwd=REPO, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "seg"
    process = train_cli(str(recipe))
    _kill_in_phase(process, run_dir / "checkpoints" / "state.json", 1)
    resumed = train_cli(str(recipe), "--resume")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in out
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err[-3000:]

    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    history = json.loads((tmp_path / "by_hand.json").read_text())["history"]
    for row in rows:
        for key in ("loss", "dice", "val_loss", "val_dice"):
            assert float(row[key]) == history[key][int(row["epoch"])], (row["epoch"], key)
    model = load(run_dir / "model.keras")
    by_hand = np.load(tmp_path / "by_hand.npz")
    for index, weight in enumerate(model.model.get_weights()):
        np.testing.assert_array_equal(by_hand[f"arr_{index}"], weight)
    card = json.loads((run_dir / "export" / "seg" / "1" / "assets.extra" / "model_card.json").read_text())
    assert card["export_parity_images"] >= 1 and card["classes"] == ["background", "lesion"]
    figures = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= figures["val_dice"] <= 1 and "per_class" in figures["val_figures"]
