"""Recipe files: validation with file:line errors, extends, --set, shipped examples."""

import textwrap

import pytest
import yaml

from restransfer.cli.config import RecipeError, load_recipe

from conftest import REPO, SHARED

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path, text, overrides=()):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, text), overrides)
    return caught.value.problems


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    needs_shared = "../../shared" in recipe.read_text()
    if needs_shared and not SHARED.exists():
        pytest.skip(f"{recipe.name} reads ../shared, which is absent")
    config, resolved = load_recipe(recipe)
    assert config.name == recipe.stem and resolved["backbone"]["name"] == config.backbone.name


def test_negative_lr_names_file_line_and_field(tmp_path):
    found = problems(tmp_path, """\
        data: {source: "sklearn:digits"}
        fine_tune:
          - trainable: head
            epochs: 1
          - trainable: all
            lr: -0.001
        """)
    assert found == [f"{tmp_path / 'r.yaml'}:6: fine_tune[1].lr: must be > 0.0, got -0.001"]


def test_many_mistakes_reported_at_once(tmp_path):
    found = problems(tmp_path, """\
        backbone:
          name: resnet05
          weigths: imagenet
        input: {image_size: 16, channels: 2}
        data:
          source: missing_folder
          batch_size: many
          augmentation: [{name: Blurr}]
        fine_tune: [{trainable: stage7}]
        seed: -1
        bogus: 1
        """)
    text = "\n".join(found)
    expected = [
        ":2: backbone.name: unknown backbone 'resnet05'; did you mean 'resnet50'?",
        ":3: backbone.weigths: unknown key; did you mean 'weights'?",
        ":4: input.image_size: must be >= 32, got 16",
        ":4: input.channels:",
        ":7: data.batch_size:",
        ":8: data.augmentation[0]: unknown albumentations transform 'Blurr'; did you mean 'Blur'?",
        ":9: fine_tune[0].trainable: Unknown stage spec 'stage7'",
        ":10: seed: must be >= 0, got -1",
        ":11: bogus: unknown key",
        ":6: data.source: no such file or directory:",
    ]
    for fragment in expected:
        assert fragment in text, fragment
    assert len(found) == len(expected)


def test_unknown_preset_and_transform_arguments(tmp_path):
    found = problems(tmp_path, """\
        data:
          source: "sklearn:digits"
          augmentation: [{name: HorizontalFlip, p: often}]
        fine_tune: two_phaze
        """)
    assert any(":4: fine_tune: unknown preset 'two_phaze'; did you mean 'two_phase'?" in p for p in found)
    assert any(":3: data.augmentation[0]: HorizontalFlip: bad arguments" in p for p in found)


def test_missing_required_and_wrong_types(tmp_path):
    found = problems(tmp_path, "backbone: {name: resnet18}\ntask: detection\n")
    assert any("data: required field is missing" in p for p in found)
    assert any(":2: task:" in p for p in found)


def test_yaml_tags_and_bad_yaml_are_rejected(tmp_path):
    found = problems(tmp_path, "data: !!python/object/apply:os.system ['echo hacked']\n")
    assert "not valid YAML" in found[0]
    found = problems(tmp_path, "data: {source: [unclosed\n")
    assert "not valid YAML" in found[0] and "r.yaml:" in found[0]


def test_extends_and_overrides(tmp_path):
    base = write(tmp_path, """\
        backbone: {name: resnet18, weights: null}
        data: {source: "sklearn:digits", batch_size: 16}
        fine_tune: [{trainable: head, epochs: 3}, {trainable: all, epochs: 3, lr: 0.0001}]
        output_dir: out
        """, "base.yaml")
    (tmp_path / "child").mkdir()
    child = write(tmp_path / "child", "extends: ../base.yaml\ndata: {batch_size: 8}\n")
    config, resolved = load_recipe(child, ["fine_tune[0].epochs=1", "backbone.name=resnet34"])
    assert config.data.source == "sklearn:digits" and config.data.batch_size == 8
    assert [p.epochs for p in config.phases()] == [1, 3]
    assert config.backbone.name == "resnet34"
    assert config.output_dir == str(tmp_path / "out"), "paths are relative to the file that sets them"
    assert yaml.safe_load(yaml.safe_dump(resolved))["fine_tune"][0]["epochs"] == 1
    with pytest.raises(RecipeError, match=r"--set fine_tune\[5\].epochs=1.*does not exist"):
        load_recipe(child, ["fine_tune[5].epochs=1"])
    with pytest.raises(RecipeError, match=r"--set fine_tune\[0\].lr=-1: fine_tune\[0\].lr: must be > 0"):
        load_recipe(child, ["fine_tune[0].lr=-1"])


def test_extends_loop_is_an_error(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


# Fields of a recipe file that configure the run around the recipe, not the recipe object.
RUN_LEVEL_FIELDS = {"name", "task", "fine_tune", "fine_tune_epochs", "output_dir", "data.source",
                    "data.validation", "data.test", "data.cv_folds", "data.csv", "export.enabled",
                    "export.model_name", "export.top_k"}
# Constructor arguments a recipe file sets through something else than a field of that name.
_DERIVED = {"class_names": "the training data", "num_classes": "the training data", "phases": "fine_tune / fine_tune_epochs"}
DERIVED_ARGUMENTS = {
    "medical": {**_DERIVED, "multi_label": "task: multilabel", "decode_options": "medical.window / medical.normalize"},
    "segmentation": {"num_classes": "the training data", "phases": "fine_tune / fine_tune_epochs",
                     "decode_options": "none (the medical section's)"},
}
@pytest.mark.parametrize("task", ["medical", "segmentation"])
def test_every_recipe_field_reaches_the_recipe_or_is_run_level(task):
    # the mapping is derived from the schema: a field added to either side without the other
    # would be silently dropped, which this catches (a task's own section counts for its task)
    from pydantic import BaseModel

    from restransfer.cli.config import RecipeConfig
    from restransfer.cli.runs import recipe_arguments, recipe_class, recipe_parameters
    from restransfer.tasks.registry import TASKS

    config, _ = load_recipe(REPO / "recipes" / "digits_demo.yaml", [f"task={task}"])
    cls = recipe_class(task)
    arguments = recipe_arguments(config, cls)
    other_sections = {spec.section for spec in TASKS.values() if spec.section and spec.section != TASKS[task].section}
    fields = set()
    for name, field in RecipeConfig.model_fields.items():
        section = getattr(config, name)
        if isinstance(section, BaseModel):
            if name not in other_sections:
                fields |= {f"{name}.{sub}" for sub in type(section).model_fields}
        else:
            fields.add(name)
    reached = {f for f in fields if f not in RUN_LEVEL_FIELDS}
    if task == "segmentation":  # the classifier head's options (refused by the schema for this task)
        reached -= {"head.dropout", "head.hidden_units"}
    assert len(arguments) == len(reached), sorted(reached)
    assert recipe_parameters(cls) - set(arguments) == set(DERIVED_ARGUMENTS[task])


def test_weights_presets_by_name_in_recipe_files(tmp_path):
    base = 'data: {source: "sklearn:digits"}\n'
    config, _ = load_recipe(write(tmp_path, base + "backbone: {name: resnet50, weights: torchvision_v2}\n"))
    assert config.backbone.weights == "torchvision_v2"
    found = problems(tmp_path, base + "backbone: {name: resnet18, weights: keras}\n")
    assert len(found) == 1 and "r.yaml:2: backbone" in found[0] and "torchvision_v1" in found[0]
