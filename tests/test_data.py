"""Data sources, bad files, and the augmentation pipeline."""

import logging

import numpy as np
import pytest

from restransfer import data
from restransfer.augmentation import build_transform

from conftest import HYMENOPTERA, require_shared, write_image


def test_image_folder_with_splits(tiny_folder):
    train = data.image_folder(tiny_folder, split="train", progress=False)
    assert train.class_names == ["bright", "dark"] and len(train) == 24
    images = list(train.dataset.take(2).as_numpy_iterator())
    assert images[0][0].dtype == np.uint8 and images[0][0].ndim == 3


def test_bad_files_are_skipped_with_names_or_fail_strict(tiny_folder, caplog):
    ants = tiny_folder / "train" / "bright"
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "text.png").write_text("not an image")
    good = (ants / "bright1.png").read_bytes()
    (ants / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="restransfer.data"):
        loaded = data.image_folder(tiny_folder, split="train", progress=False)
    skipped = {s.path.split("/")[-1]: s.reason for s in loaded.skipped}
    assert set(skipped) == {"empty.jpg", "text.png", "truncated.png"}
    assert "0 bytes" in skipped["empty.jpg"]
    assert len(loaded) == 24 and "3 file(s) skipped" in caplog.text
    with pytest.raises(data.BadImagesError) as caught:
        data.image_folder(tiny_folder, split="train", policy="strict", progress=False)
    assert all(name in str(caught.value) for name in skipped)


def test_odd_formats_decode_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).save(tmp_path / "anim.gif", save_all=True,
                              append_images=[Image.fromarray(255 - rgb)])
    Image.fromarray(np.full((6, 7), 40000, np.uint16)).save(tmp_path / "deep.png")
    rgba = np.dstack([rgb, np.zeros((10, 12), np.uint8)])
    write_image(tmp_path / "clear.png", rgba)
    for name in ("cmyk.jpg", "anim.gif", "deep.png", "clear.png"):
        image = data.load_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape[-1] == 3, name
    assert data.load_image(tmp_path / "deep.png")[0, 0, 0] == round(40000 * 255 / 65535)
    assert (data.load_image(tmp_path / "clear.png") == 255).all(), "transparent -> white"
    # EXIF orientation 6 (rotate 90 CW): a 10x12 image is shown as 12x10
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    assert data.load_image(tmp_path / "rotated.jpg").shape[:2] == (12, 10)


def test_augmentation_is_seeded_and_changes_between_epochs(tiny_folder):
    folder = data.image_folder(tiny_folder, split="train", progress=False)
    make = lambda: data.make_pipeline(folder, 32, 24, training=True, augmentation="light", seed=3)
    first, second = make(), make()
    epoch1 = next(iter(first))[0].numpy()
    epoch2 = next(iter(first))[0].numpy()
    again = next(iter(second))[0].numpy()
    np.testing.assert_array_equal(epoch1, again)
    assert not np.array_equal(np.sort(epoch1.ravel()), np.sort(epoch2.ravel()))


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="Blurr"):
        build_transform([{"name": "Blurr"}], 32)
    with pytest.raises(ValueError, match="HorizontalFlip"):
        build_transform([{"name": "HorizontalFlip", "p": "often"}], 32)


def test_stratified_split_keeps_proportions():
    labels = np.array([0] * 40 + [1] * 10)
    source = data.from_arrays(np.zeros((50, 4, 4, 3), np.uint8), labels)
    train, val = data.stratified_split(source, 0.2, seed=0)
    assert len(val) == 10 and np.bincount(val.labels).tolist() == [8, 2]


def test_hymenoptera_has_no_undecodable_files():
    root = require_shared(HYMENOPTERA)
    train = data.image_folder(root, split="train", progress=False)
    assert len(train) == 245 and not train.skipped
