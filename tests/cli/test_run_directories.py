"""Nothing a recipe or a command line names can delete or write outside its root: run names
and export names are one plain path component, ``--overwrite`` replaces only directories
restransfer marked as its own (and only what runs write in them), and the run lock is taken
before anything is deleted, on a file deletion cannot remove."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from restransfer import cli
from restransfer.cli import runs
from restransfer.cli.config import RecipeError, load_recipe

ESCAPES = ["..", ".", "../x", "a/b", "/tmp/x", ".hidden", "x/../../y", "..."]


def project(tmp_path):
    """A user's project: recipes/, data/keep.txt, and a recipe whose runs go to ../runs."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("the user's data")
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(textwrap.dedent("""\
        backbone: {name: resnet18, weights: null}
        input: {image_size: 32}
        data: {source: "sklearn:digits"}
        output_dir: ../runs
        """))
    return recipe


@pytest.mark.parametrize("name", ESCAPES)
def test_a_run_name_that_leaves_output_dir_is_refused_and_nothing_is_deleted(tmp_path, name, capsys):
    recipe = project(tmp_path)
    with pytest.raises(RecipeError, match="name"):
        load_recipe(recipe, [f"name={name}"])
    # the reproduction of the review: --set name=.. --overwrite deleted the whole project
    assert cli.main(["train", str(recipe), "--set", f"name={name}", "--overwrite"]) == 2
    assert "name" in capsys.readouterr().err
    assert (tmp_path / "data" / "keep.txt").read_text() == "the user's data"
    assert recipe.is_file()


@pytest.mark.parametrize("name", ESCAPES[:4])
def test_an_export_name_that_leaves_its_folder_is_refused(tmp_path, name):
    recipe = project(tmp_path)
    with pytest.raises(RecipeError, match="export.model_name"):
        load_recipe(recipe, [f"export.model_name={name}"])
    from restransfer.paths import PathEscape, child

    with pytest.raises(PathEscape):
        child(tmp_path / "export", name, "model name")


def test_a_symlink_named_like_the_run_is_never_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(outside)
    from restransfer.paths import PathEscape, child

    with pytest.raises(PathEscape, match="outside"):
        child(tmp_path / "runs", "r", "run name")
    with pytest.raises(runs.RunDirectoryExists, match="symbolic link"):
        runs.prepare_run_dir(tmp_path / "runs" / "r", overwrite=True, resume=False)
    assert (outside / "precious.txt").is_file()


def test_overwrite_replaces_only_marked_run_directories_and_only_run_entries(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    # a folder of the user's that happens to have the run's name: never replaced
    run_dir.mkdir(parents=True)
    (run_dir / "model.keras").write_text("the user's own file")
    with pytest.raises(runs.RunDirectoryExists, match="not made by restransfer"):
        runs.prepare_run_dir(run_dir, overwrite=True, resume=False)
    assert (run_dir / "model.keras").read_text() == "the user's own file"

    # a real run directory with progress, and a note a user left in it
    other = tmp_path / "runs" / "done"
    runs.prepare_run_dir(other, overwrite=False, resume=False)
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "last.keras").write_text("checkpoint")
    (other / "model.keras").write_text("model")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunDirectoryExists, match="--overwrite"):
        runs.prepare_run_dir(other, overwrite=False, resume=False)
    runs.prepare_run_dir(other, overwrite=True, resume=False)
    assert sorted(p.name for p in other.iterdir()) == [runs.MARKER, "notes.txt"]
    assert (other / "notes.txt").read_text() == "mine"


def test_a_failed_start_does_not_block_the_retry(tmp_path):
    """A run that stopped before its first epoch (only the resolved recipe and split written)
    is reused by the next start without --overwrite."""
    run_dir = tmp_path / "runs" / "r"
    runs.prepare_run_dir(run_dir, overwrite=False, resume=False)
    (run_dir / "recipe.resolved.yaml").write_text("old")
    (run_dir / "split.csv").write_text("path,label,split,group\n")
    runs.prepare_run_dir(run_dir, overwrite=False, resume=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [runs.MARKER]


def test_overwrite_waits_for_the_lock_of_a_live_run(tmp_path):
    """The review's reproduction: with the lock held (as a live run holds it), an --overwrite
    start must refuse before deleting anything, and the lock file must survive a replacement."""
    recipe = project(tmp_path)
    config, _ = load_recipe(recipe, ["name=live"])
    run_dir = runs.run_directory(config)
    runs.prepare_run_dir(run_dir, overwrite=False, resume=False)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.keras").write_text("the live run's checkpoint")
    with runs.RunLock(run_dir) as lock:
        with pytest.raises(runs.RunLocked, match=f"PID {os.getpid()}"):
            runs.train(recipe, ["name=live"], overwrite=True)
        assert (run_dir / "checkpoints" / "last.keras").read_text() == "the live run's checkpoint"
        assert not lock.path.is_relative_to(run_dir), "deleting the run directory would remove the lock"
    runs.prepare_run_dir(run_dir, overwrite=True, resume=False)
    assert lock.path.is_file()


def test_the_marker_says_who_made_the_directory(tmp_path):
    run_dir = runs.prepare_run_dir(tmp_path / "runs" / "r", overwrite=False, resume=False)
    assert json.loads((run_dir / runs.MARKER).read_text())["created_by"] == "restransfer"
    assert runs.is_run_directory(run_dir) and not runs.is_run_directory(Path(tmp_path))
