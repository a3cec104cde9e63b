"""What a newcomer hits, through the door they meet it at: skipped files recorded everywhere,
refusals before TensorFlow loads that leave nothing behind, a data summary that warns about
degenerate data, early stopping said aloud, the README's commands valid, and documented
constructors. (Ctrl-C, the resumed count and a finished run's --resume: tests/cli/test_runs.py.)"""

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import restransfer as rt
from restransfer import cli
from restransfer.cli import runs
from restransfer.cli.config import load_recipe

from conftest import REPO, cli_in_fresh_process, require_shared, write_image

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def folder_with_bad_files(root, classes=("bright", "dark")):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, (low, high) in zip(classes, ((170, 255), (0, 85))):
            for i in range(count):
                write_image(root / split / label / f"{label}{i}.png", rng.integers(low, high, (30, 34, 3), dtype=np.uint8))
    good = (root / "train" / classes[0] / f"{classes[0]}0.png").read_bytes()
    jpeg = root / "train" / classes[0] / "photo.jpg"
    write_image(jpeg, rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (root / "train" / classes[0] / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    (root / "train" / classes[0] / "notes.jpg").write_text("not an image")
    (root / "train" / classes[1] / "empty.png").write_bytes(b"")
    assert good
    return root


def recipe_file(tmp_path, body, name="r"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_skipped_files_are_recorded_everywhere_and_evaluate_warns_about_training_data(tmp_path, capsys):
    """A medical run on a folder with a truncated JPEG, a text file named .jpg and a 0-byte file:
    metrics.json, the report, the model card and the Python API all name the three, in plain
    words; `restransfer evaluate` on the training folder gives the clinical figures and says it
    was the model's training data."""
    folder = folder_with_bad_files(tmp_path / "data")
    recipe = recipe_file(tmp_path, f"""\
        task: medical
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32}}
        data: {{source: {folder}, batch_size: 8, augmentation: none}}
        fine_tune: [{{trainable: head, epochs: 1, lr: 0.01}}]
        medical: {{positive_class: dark, gradcam_images: 0}}
        export: {{model_name: skipped}}
        output_dir: {tmp_path / 'runs'}
        """)
    run_dir = runs.train(recipe, verbose="lines")
    out = capsys.readouterr().out
    assert "data:" in out and "train: 17 images (bright 9, dark 8)" in out
    expected = {"truncated.jpg": "a damaged JPEG: the data ends early (a truncated file)",
                "notes.jpg": "not an image", "empty.png": "an empty file (0 bytes)"}
    recorded = {os.path.basename(s["path"]): s["reason"] for s in json.loads((run_dir / "metrics.json").read_text())["skipped_files"]}
    assert set(recorded) == set(expected) and all(recorded[k].startswith(v) for k, v in expected.items())
    report = (run_dir / "report.html").read_text()
    assert "3 unusable file(s) skipped" in report and all(name in report for name in expected)
    card = json.loads(next((run_dir / "export" / "skipped").glob("*/assets.extra/model_card.json")).read_text())
    assert sorted(s["path"] for s in card["skipped_files"]) == sorted(expected)
    for reason in recorded.values():
        assert "function_node" not in reason and "{{" not in reason

    by_python = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, positive_class="dark",
                                        augmentation="none", phases=[rt.Phase("head", epochs=1)])
    by_python.fit(str(folder), verbose=0)
    assert sorted(os.path.basename(s.path) for s in by_python.skipped) == sorted(expected)

    capsys.readouterr()
    assert cli.main(["evaluate", str(run_dir), "--data", str(folder / "train"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "were this model's training data" in err and "optimistic" in err
    figures = json.loads(out)
    assert {"sensitivity", "specificity", "auc", "threshold", "accuracy"} <= set(figures)
    assert figures["overlap_with_run"]["images"] == 17 and figures["overlap_with_run"]["train"] > 0


REFUSALS = {
    "one class": ("data: {{source: {one_class}}}\n", "has one class ('only'): a classifier needs at least 2"),
    "no positive class": ("task: medical\ndata: {{source: {two_classes}}}\n",
                          "a binary medical task needs its positive class, one of ['a', 'b']"),
    # what each task needs of its recipe and data (its entry in tasks/registry.py), checked by code naming no task
    "segmentation without masks": ("task: segmentation\ndata: {{source: {two_classes}}}\n",
                                   "needs images/ and masks/ sub-folders"),
    "a head for segmentation": ("task: segmentation\nhead: {{dropout: 0.3}}\ndata: {{source: {two_classes}}}\n",
                                "a segmentation model has none (its own options, the decoder's included, are in the "
                                "recipe's segmentation: section)"),
    "cross-validation of multi-label": ("task: multilabel\ndata: {{source: {two_classes}, cv_folds: 2}}\n",
                                        "is for single-label tasks, not multilabel"),
    "offline imagenet weights": ("backbone: {{name: resnet18, weights: imagenet}}\ndata: {{source: {two_classes}}}\n",
                                 "resnet18.torchvision_v1: resnet18-f37072fd.pth is not cached"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_that_need_no_training_come_before_tensorflow_and_leave_nothing(tmp_path, case, monkeypatch):
    monkeypatch.setenv("RESTRANSFER_CACHE", str(tmp_path / "empty_cache"))
    for name, classes in (("one_class", ["only"]), ("two_classes", ["a", "b"])):
        for label in classes:
            write_image(tmp_path / name / label / "x.png", np.zeros((8, 8, 3), np.uint8))
    body, message = REFUSALS[case]
    recipe = recipe_file(tmp_path, body.format(one_class=tmp_path / "one_class", two_classes=tmp_path / "two_classes")
                         + ("backbone: {name: resnet18, weights: null}\n" if "weights" not in body else "")
                         + f"output_dir: {tmp_path / 'runs'}\n")
    code, tensorflow_loaded, seconds, result = cli_in_fresh_process(
        ["train", recipe], env={**ENV, "RESTRANSFER_CACHE": str(tmp_path / "empty_cache")}, timeout=120)
    assert code == 2 and tensorflow_loaded is False, result.stderr
    assert seconds < 3.0
    assert message in result.stderr and f"{recipe}:" in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing is written by a refused start"
    validated = subprocess.run([sys.executable, "-m", "restransfer", "validate", str(recipe)], capture_output=True,
                               text=True, cwd=REPO, env={**ENV, "RESTRANSFER_CACHE": str(tmp_path / "empty_cache")},
                               timeout=120)
    assert validated.returncode == 2 and message in validated.stderr and "not checked without TensorFlow" in validated.stdout


def test_the_data_summary_warns_about_nearly_constant_images_and_normalize_must_act(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for label in ("tumor", "no_tumor"):
        for i in range(6):  # levels 0-2 only: what the degenerate brain MRI copies held
            write_image(tmp_path / "flat" / label / f"{i}.png", rng.integers(0, 3, (20, 20), dtype=np.uint8))
    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, positive_class="tumor")
    recipe._training_data(str(tmp_path / "flat"), None, verbose=1)
    out = capsys.readouterr().out
    assert "images are nearly constant" in out and "pixels 0-2" in out
    strict = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, positive_class="tumor",
                                     normalize="percentile")
    with pytest.raises(ValueError, match="normalize='percentile' acts on DICOM"):
        strict._training_data(str(tmp_path / "flat"), None)


def test_early_stopping_is_said_and_recorded(tiny_folder, capsys):
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=8,
                                     augmentation="none", early_stopping_patience=1,
                                     phases=[rt.Phase("all", epochs=6, lr=0.05, schedule="constant")])
    history = recipe.fit(tiny_folder, verbose=2)
    (kept,) = history.kept
    out = capsys.readouterr().out
    assert f"kept epoch {kept['kept_epoch']}'s weights" in out
    if kept["stopped_after_epoch"]:
        assert f"early stopping after epoch {kept['stopped_after_epoch']}" in out
        assert history.epochs == kept["stopped_after_epoch"] < 6
    assert recipe.describe()["kept_weights"] == [kept]


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("restransfer "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_readmes_commands_parse_and_their_recipes_load():
    commands = readme_commands()
    assert len(commands) >= 15
    parser = cli.main.__globals__["build_parser"]()
    parsed = [parser.parse_args(argv) for argv in commands]
    # the example recipes read ../shared (the repo's sibling): loading them needs it
    require_shared(REPO.parent / "shared" / "data")
    for args in parsed:
        if args.command in ("train", "lr-find") and (REPO / args.recipe).is_file():  # not placeholders (recipe.yaml)
            load_recipe(REPO / args.recipe, args.set)
        if args.command == "validate":
            import glob

            paths = [p for pattern in args.recipes for p in sorted(glob.glob(str(REPO / pattern))) or [pattern]]
            for path in paths:  # offline, a recipe whose preset weights are not cached is refused, rightly
                config, _ = load_recipe(path)
                from restransfer.cli.preflight import weights_problems

                expected = 2 if weights_problems(config) else 0
                assert cli.main(["validate", path]) == expected, path


@pytest.mark.parametrize("recipe_class", [rt.ClassificationRecipe, rt.MedicalImagingRecipe, rt.SegmentationRecipe])
def test_every_constructor_argument_is_documented(recipe_class):
    documented = recipe_class.__doc__
    for cls in recipe_class.__mro__:
        if "__init__" in vars(cls):
            for name, parameter in inspect.signature(cls.__init__).parameters.items():
                if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                    assert re.search(rf"\b{name}\b", documented), f"{recipe_class.__name__}: {name} is not documented"
