"""Every reported figure names its split and what was tuned on it; nothing tuned on a split is
scored there silently; identical images never straddle a split; a binary medical task names
its positive class; a user's tf.data dataset of any length trains whole epochs."""

import textwrap

import numpy as np
import pytest
import tensorflow as tf

import restransfer as rt
from restransfer import data
from restransfer.cli import runs
from restransfer.cli.config import load_recipe
from restransfer.training.distribute import Worker
from restransfer.training.phases import Phase

from conftest import write_image


def duplicated_folder(root, copies=6):
    """Two classes of distinct images, plus ``copies`` files that repeat other files' bytes."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(10):
            write_image(root / label / f"{label}{i}.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    for i in range(copies):  # same bytes, another name (as the brain MRI folder has)
        source = root / "a" / f"a{i}.png"
        (root / "a" / f"copy{i}.png").write_bytes(source.read_bytes())
    return root


def _digests(part):
    return set(data.content_digests(part))


@pytest.mark.parametrize("groups", [False, True], ids=["no-groups", "patient-groups"])
def test_identical_images_never_straddle_a_split_or_folds(tmp_path, groups):
    source = data.image_folder(duplicated_folder(tmp_path))
    if groups:
        source.groups = np.array([f"p{i // 2}" for i in range(len(source))])
    for train, held_out in [data.stratified_split(source, 0.3, seed) for seed in range(4)] + list(data.kfold(source, 4)):
        assert not _digests(train) & _digests(held_out)
        if groups:
            assert not set(train.groups) & set(held_out.groups)
    # without the fix, plain k-fold separates most of the 6 copies from their originals
    assert data.split_groups(source) is not None


def test_a_binary_medical_task_must_name_its_positive_class():
    images = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 1), dtype=np.uint8)
    source = data.from_arrays(images, np.arange(16) % 2, class_names=["abnormal", "normal"])
    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, channels=1,
                                     val_fraction=0, phases=[Phase("all", epochs=1)])
    with pytest.raises(ValueError, match=r"positive_class.*\['abnormal', 'normal'\]"):
        recipe.fit(source, verbose=0)
    assert recipe.model is None, "refused before building or training anything"
    wrong = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, channels=1,
                                    positive_class="tumour", val_fraction=0, phases=[Phase("all", epochs=1)])
    with pytest.raises(ValueError, match="'tumour' is not one of"):
        wrong.fit(source, verbose=0)


def test_clinical_figures_on_the_calibration_data_are_labelled_optimistic():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (24, 32, 32, 1), dtype=np.uint8)
    val = data.from_arrays(images[:12], np.arange(12) % 2, class_names=["normal", "lesion"])
    test = data.from_arrays(images[12:], np.arange(12) % 2, class_names=["normal", "lesion"])
    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, channels=1,
                                     class_names=["normal", "lesion"], positive_class="lesion")
    recipe.build()
    recipe.calibrate(val)
    assert "optimistic" in recipe.evaluate_clinical(val, bootstrap=0)
    assert "optimistic" not in recipe.evaluate_clinical(test, bootstrap=0)


def test_cross_validation_never_early_stops_on_the_held_out_fold(tmp_path, monkeypatch):
    folder = duplicated_folder(tmp_path / "images", copies=0)
    recipe_file = tmp_path / "cv.yaml"
    recipe_file.write_text(textwrap.dedent(f"""\
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32}}
        data: {{source: {folder}, cv_folds: 2, val_fraction: 0.25}}
        fine_tune: [{{trainable: all, epochs: 1}}]
        training: {{early_stopping_patience: 2}}
        output_dir: {tmp_path / 'runs'}
        """))
    seen = []

    class Stop(Exception):
        pass

    def fit(self, train, validation_data=None, **kwargs):
        seen.append((train, validation_data))
        raise Stop

    monkeypatch.setattr(rt.ClassificationRecipe, "fit", fit)
    config, _ = load_recipe(recipe_file)
    splits = runs.load_splits(config)
    everything = splits.train
    (tmp_path / "runs" / "cv").mkdir(parents=True)
    with pytest.raises(Stop):
        runs._cross_validate(config, splits, tmp_path / "runs" / "cv", verbose=0)
    train, validation = seen[0]
    _, held_out = next(data.kfold(everything, 2, config.seed))
    assert validation is not None and len(validation) > 0
    assert not set(validation.paths) & set(held_out.paths)
    assert not set(train.paths) & set(held_out.paths)


def test_split_roles_name_what_was_tuned_where(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("backbone: {name: resnet18, weights: null}\ndata: {source: 'sklearn:digits'}\n"
                           "task: medical\nmedical: {positive_class: '1'}\n")
    config, _ = load_recipe(recipe_file)
    roles = runs.split_roles(runs.recipe_from_config(config), tuned_val=True, test=True)
    assert "optimistic" in roles["val_*"] and "threshold" in roles["val_*"] and "early stopping" in roles["val_*"]
    assert roles["test_*"] == "test split: nothing was tuned on it"


def _batches(count=24, batch=4):
    images = np.random.default_rng(0).integers(0, 255, (count, 32, 32, 3)).astype("float32")
    labels = np.arange(count) % 2
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def test_a_dataset_of_unknown_length_trains_whole_epochs_and_an_infinite_one_is_refused():
    unknown = _batches().filter(lambda x, y: True)  # cardinality: unknown
    assert int(unknown.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, num_classes=2,
                                     early_stopping_patience=None, phases=[Phase("all", epochs=2)])
    recipe.fit(unknown, verbose=0)
    assert int(recipe.model.optimizer.iterations.numpy()) == 2 * 6  # 6 batches an epoch, not 1
    with pytest.raises(ValueError, match="infinite"):
        recipe.fit(_batches().repeat(), verbose=0)


def test_each_worker_trains_on_its_shard_of_a_users_dataset():
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, num_classes=2)
    dataset = _batches(count=16, batch=2)
    seen = {}
    for index in (0, 1):
        recipe.worker = Worker(index=index, count=2, replicas=2)
        pipeline = recipe._train_pipelines(dataset)(0)
        seen[index] = [batch[0].numpy().sum() for batch in pipeline.take(4)]
    assert not set(seen[0]) & set(seen[1]), "the two workers saw the same batches"
