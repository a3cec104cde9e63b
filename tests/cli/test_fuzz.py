"""Fuzzing, bounded: mutated recipes never crash; random bytes as images never do either."""

import random

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restransfer import cli
from restransfer import data

from conftest import REPO

BASE = yaml.safe_load((REPO / "recipes" / "digits_demo.yaml").read_text())
# hymenoptera.yaml has an explicit list of phases; point it at data that is always there
BASE_PHASES = yaml.safe_load((REPO / "recipes" / "hymenoptera.yaml").read_text())
BASE_PHASES["data"]["source"] = "sklearn:digits"
BASE_PHASES["backbone"]["weights"] = None

leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.integers(), max_size=3))


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, prefix + (index,))


def mutate(recipe, choice, replacement, operation):
    recipe = yaml.safe_load(yaml.safe_dump(recipe))
    targets = [p for p in paths(recipe) if p]
    path = targets[choice % len(targets)]
    holder = recipe
    for key in path[:-1]:
        holder = holder[key]
    if operation == "replace":
        holder[path[-1]] = replacement
    elif operation == "delete":
        del holder[path[-1]]
    elif operation == "rename" and isinstance(holder, dict):
        holder[f"{path[-1]}x"] = holder.pop(path[-1])
    return recipe


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from([BASE, BASE_PHASES]), choice=st.integers(0, 10**6), replacement=leaf,
       operation=st.sampled_from(["replace", "delete", "rename"]))
def test_mutated_recipes_give_validation_errors_not_tracebacks(tmp_path, capsys, base, choice, replacement,
                                                              operation):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(mutate(base, choice, replacement, operation)))
    code = cli.main(["validate", str(path)])
    assert code in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert str(path) in err  # every problem names the file


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_text_as_a_recipe(tmp_path, capsys, text):
    path = tmp_path / "text.yaml"
    path.write_text(text)
    assert cli.main(["validate", str(path)]) in (0, 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_random_bytes_as_images_are_skipped_and_counted(tmp_path_factory, blobs):
    root = tmp_path_factory.mktemp("bytes")
    good = root / "a" / "good.png"
    good.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    for index, blob in enumerate(blobs):
        (root / "a" / f"junk{index}{random.choice(['.jpg', '.png', '.gif'])}").write_bytes(blob)
    loaded = data.image_folder(root, progress=False)
    assert len(loaded) + len(loaded.skipped) == len(blobs) + 1
    assert str(good) in loaded.paths
    if loaded.skipped:
        with pytest.raises(data.BadImagesError):
            data.image_folder(root, policy="strict", progress=False)
