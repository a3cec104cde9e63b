"""Data sources, bad files, and the augmentation pipeline."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from restransfer import data
from restransfer.data.augmentation import build_transform

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


def _jpeg_with_exif(rgb, tiff: bytes, decoy: bool) -> bytes:
    """A baseline JPEG with an EXIF APP1 segment holding ``tiff`` (after a comment segment
    that contains a stray "Exif\\0\\0" when ``decoy``)."""
    import io
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    plain = buffer.getvalue()
    segments = b""
    if decoy:
        comment = b"says Exif\x00\x00 but is a comment"
        segments += b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    payload = b"Exif\x00\x00" + tiff
    segments += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return plain[:2] + segments + plain[2:]


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("decoy", [False, True])
def test_exif_orientation_either_byte_order_and_after_other_segments(tmp_path, big_endian, decoy):
    import struct

    rgb = np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    order = ">" if big_endian else "<"
    # TIFF header, then one directory: an unrelated tag, then Orientation = 8 (SHORT)
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "I", 8) + struct.pack(order + "H", 2)
    tiff += struct.pack(order + "HHIHH", 0x010F, 3, 1, 0, 0) + struct.pack(order + "HHIHH", 0x0112, 3, 1, 8, 0)
    tiff += struct.pack(order + "I", 0)
    path = tmp_path / "oriented.jpg"
    path.write_bytes(_jpeg_with_exif(rgb, tiff, decoy))
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        assert image.getexif()[0x0112] == 8  # Pillow reads the file we made
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    decoded = data.load_image(path)
    assert decoded.shape == expected.shape == (12, 10, 3)  # rotated 90 degrees
    np.testing.assert_array_equal(decoded, expected)


def test_augmentation_is_seeded_and_changes_between_epochs(tiny_folder, augmentation="light"):
    folder = data.image_folder(tiny_folder, split="train", progress=False)
    make = lambda start=0: data.make_pipeline(folder, 32, 24, training=True, augmentation=augmentation,
                                              seed=3, start_epoch=start)
    batches = iter(make())  # 24 images, batch 24: one batch per epoch
    epoch1, epoch2 = next(batches)[0].numpy(), next(batches)[0].numpy()
    np.testing.assert_array_equal(epoch1, next(iter(make()))[0].numpy())
    assert not np.array_equal(np.sort(epoch1.ravel()), np.sort(epoch2.ravel()))
    # a pipeline started at epoch 1 (a resumed run) sees exactly what epoch 1 saw
    np.testing.assert_array_equal(epoch2, next(iter(make(start=1)))[0].numpy())


@pytest.mark.parametrize("augmentation", ["none", "light"])
def test_pixels_decoded_once_are_the_pixels_decoded_every_epoch(tiny_folder, augmentation, caplog):
    """Training reads images decoded and resized once (float32, or uint8 where augmentation
    rounds anyway): batch for batch the same as decoding every epoch, resumed or not; the
    files are not read again; too big for the limit, every epoch decodes."""
    from restransfer.data import pipeline

    folder = data.image_folder(tiny_folder, split="train", progress=False)
    make = lambda cache, start=0: [x.numpy() for x, _ in data.make_pipeline(
        folder, 32, 10, training=True, augmentation=augmentation, seed=4, start_epoch=start, epochs=3,
        cache_pixels=cache)]
    decoded_every_epoch, decoded_once = make(False), make(True)
    assert len(decoded_once) == 9
    for every, once in zip(decoded_every_epoch, decoded_once):
        np.testing.assert_array_equal(every, once)
    key = (32, "uint8" if augmentation == "light" else "float32")
    assert folder._pixels[key].shape == (24, 32, 32, 3)
    for path in folder.paths:  # the cache is what is read now
        write_image(Path(path), np.zeros((9, 9, 3), np.uint8))
    np.testing.assert_array_equal(make(True, start=1)[0], decoded_every_epoch[3])  # resumed at epoch 1
    # evaluation pipelines (validation during fit) too
    val = data.image_folder(tiny_folder, split="val", progress=False)
    plain = [x.numpy() for x, _ in data.make_pipeline(val, 32, 5)]
    cached = [x.numpy() for x, _ in data.make_pipeline(val, 32, 5, cache_pixels=True)]
    assert len(plain) == len(cached) == 3 and all(np.array_equal(a, b) for a, b in zip(plain, cached))
    with caplog.at_level(logging.INFO, logger="restransfer.data"):
        assert pipeline.resized_pixels(val, 32, limit=1000) is None
    assert "decoding them every epoch" in caplog.text


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="Blurr"):
        build_transform([{"name": "Blurr"}], 32)
    with pytest.raises(ValueError, match="HorizontalFlip"):
        build_transform([{"name": "HorizontalFlip", "p": "often"}], 32)


def test_stratified_split_keeps_proportions():
    labels = np.array([0] * 40 + [1] * 10)
    images = np.random.default_rng(0).integers(0, 255, (50, 4, 4, 3), dtype=np.uint8)
    source = data.from_arrays(images, labels)
    train, val = data.stratified_split(source, 0.2, seed=0)
    assert len(val) == 10 and np.bincount(val.labels).tolist() == [8, 2]


def test_hymenoptera_has_no_undecodable_files():
    root = require_shared(HYMENOPTERA)
    train = data.image_folder(root, split="train", progress=False)
    assert len(train) == 245 and not train.skipped


def make_csv_folder(tmp_path, rows):
    rng = np.random.default_rng(0)
    for name in {r[0] for r in rows}:
        write_image(tmp_path / name, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    lines = ["path,label,patient"] + [",".join(r) for r in rows]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "labels.csv"


def test_csv_single_and_separator_multi_label(tmp_path):
    csv = make_csv_folder(tmp_path, [("img/a.png", "cat", "p1"), ("img/b.png", "dog", "p2"),
                                     ("img/c.png", "cat|dog", "p3")])
    multi = data.from_csv(csv, separator="|", group_column="patient", progress=False)
    assert multi.class_names == ["cat", "dog"] and multi.multi_label
    np.testing.assert_array_equal(multi.labels, [[1, 0], [0, 1], [1, 1]])
    assert multi.paths[0] == str((tmp_path / "img" / "a.png").resolve())
    assert list(multi.groups) == ["p1", "p2", "p3"]
    with pytest.raises(ValueError, match=r"row 4: label\(s\) \['cat\|dog'\]"):
        data.from_csv(csv, class_names=["cat", "dog"], progress=False)


def test_csv_label_columns_and_path_escape(tmp_path):
    write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "t.csv").write_text("path,effusion,mass\nx.png,1,0\n")
    table = data.from_csv(tmp_path / "t.csv", label_columns=["effusion", "mass"], progress=False)
    assert table.multi_label and table.labels.tolist() == [[1.0, 0.0]]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.csv").write_text("path,label\n../x.png,a\n")
    with pytest.raises(ValueError, match="escapes the data root"):
        data.from_csv(tmp_path / "sub" / "t.csv", progress=False)
    assert len(data.from_csv(tmp_path / "sub" / "t.csv", allow_outside_root=True, progress=False)) == 1
    with pytest.raises(ValueError, match="missing column"):
        data.from_csv(tmp_path / "t.csv", label_column="finding", progress=False)


def test_npz_medmnist_layout(tmp_path):
    np.savez(tmp_path / "m.npz", train_images=np.zeros((5, 28, 28), np.uint8),
             train_labels=np.array([[0], [1], [0], [1], [1]]))
    loaded = data.from_npz(tmp_path / "m.npz")
    assert len(loaded) == 5 and loaded.channels == 1 and loaded.labels.tolist() == [0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="test_images"):
        data.from_npz(tmp_path / "m.npz", split="test")


def test_tfds_missing_data_offline_fails_fast_with_one_clear_error(tmp_path):
    # downloading is on (the default): TFDS would retry for minutes; restransfer asks the
    # download server once and stops at once when it cannot be reached
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"tf_flowers.*cannot be reached.*tfds build tf_flowers"):
        data.from_tfds("tfds:tf_flowers", data_dir=str(tmp_path))
    assert time.perf_counter() - started < 30
    with pytest.raises(FileNotFoundError, match=r"tf_flowers.*downloading is off"):
        data.from_tfds("tfds:tf_flowers", data_dir=str(tmp_path), download=False)


def test_tfds_dataset_prepared_in_a_data_dir_loads_with_downloading_on(tmp_path):
    import tensorflow_datasets as tfds

    class RestransferTinyShapes(tfds.core.GeneratorBasedBuilder):
        """Six 8x8 images of two classes, prepared from memory (no download)."""

        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = tmp_path  # TFDS looks for checksums beside a builder's module; it has none

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(names=["dark", "bright"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"image": np.full((8, 8, 3), 200 * (i % 2), np.uint8), "label": i % 2}

    RestransferTinyShapes(data_dir=str(tmp_path)).download_and_prepare()
    shapes = data.from_tfds("restransfer_tiny_shapes", data_dir=str(tmp_path))  # download=True
    assert shapes.class_names == ["dark", "bright"] and sorted(shapes.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    images, labels = next(iter(data.make_pipeline(shapes, 32, 6)))
    assert images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(labels.numpy(), shapes.labels)  # TFDS' order, kept
    np.testing.assert_allclose(images.numpy().mean(axis=(1, 2, 3)), 200.0 * labels.numpy())


def test_tfds_through_the_real_loader_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        flowers = data.as_image_data("tfds:tf_flowers:train[:50%]")
        # mock_data serves num_examples per split and ignores slicing
        assert flowers.class_names[0] == "dandelion" and len(flowers) == 6
        batch = next(iter(data.make_pipeline(flowers, 32, 3)))
        assert next(iter(data.make_pipeline(flowers, 32, 3, training=True)))[0].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(batch[1].numpy(), flowers.labels[:3])
    assert batch[0].shape == (3, 32, 32, 3)


def test_grouped_splits_never_leak_a_group():
    labels = np.array([0, 1] * 30)
    groups = np.repeat(np.arange(20), 3).astype(str)
    images = np.random.default_rng(0).integers(0, 255, (60, 4, 4, 3), dtype=np.uint8)
    source = data.from_arrays(images, labels)
    source.groups = groups
    train, val = data.stratified_split(source, 0.25, seed=1)
    assert not set(train.groups) & set(val.groups)
    folds = list(data.kfold(source, n_splits=5, seed=0))
    assert len(folds) == 5
    for train, val in folds:
        assert not set(train.groups) & set(val.groups)
    assert sorted(g for _, val in folds for g in val.groups) == sorted(groups)


def test_split_file_and_duplicate_detection(tiny_folder, tmp_path):
    train = data.image_folder(tiny_folder, split="train", progress=False)
    val = data.image_folder(tiny_folder, split="val", class_names=train.class_names, progress=False)
    (tiny_folder / "val" / "dark" / "copy.png").write_bytes((tiny_folder / "train" / "dark" / "dark1.png").read_bytes())
    val = data.image_folder(tiny_folder, split="val", class_names=train.class_names, progress=False)
    pairs = data.find_duplicates(train, val)
    assert [p[1].split("/")[-1] for p in pairs] == ["copy.png"]
    written = data.write_split(tmp_path / "split.csv", {"train": train, "val": val})
    lines = written.read_text().splitlines()
    assert lines[0] == "path,label,split,group" and len(lines) == 1 + len(train) + len(val)


def test_sixteen_bit_precision_is_kept_as_float(tmp_path):
    from PIL import Image

    ramp = np.arange(0, 65536, 257 // 2, dtype=np.uint16)[:256].reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    exact = data.load_image(tmp_path / "ramp.png", channels=1, keep_precision=True)
    assert exact.dtype == np.float32
    np.testing.assert_allclose(exact[..., 0], ramp * (255 / 65535), rtol=1e-6)
    assert len(np.unique(exact)) == 256 > len(np.unique(data.load_image(tmp_path / "ramp.png")))


def test_class_in_val_but_not_train_is_an_error(tiny_folder):
    (tiny_folder / "val" / "grey").mkdir()
    write_image(tiny_folder / "val" / "grey" / "g.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="grey"):
        data.image_folder(tiny_folder, split="val", class_names=["bright", "dark"], progress=False)


def test_resolve_splits_uses_the_sources_own_parts_else_a_stratified_fraction(tmp_path, tiny_folder):
    rng = np.random.default_rng(0)
    arrays = {f"{part}_images": rng.integers(0, 255, (n, 8, 8), dtype=np.uint8) for part, n in
              (("train", 20), ("val", 6), ("test", 4))}
    arrays.update({f"{part}_labels": np.arange(n) % 2 for part, n in (("train", 20), ("val", 6), ("test", 4))})
    np.savez(tmp_path / "medmnist.npz", **arrays)
    splits = data.resolve_splits(tmp_path / "medmnist.npz", val_fraction=0.25)
    # MedMNIST layout: the file's own val_/test_ arrays, nothing split off the training arrays
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 6, 4)
    np.testing.assert_array_equal(splits.val.images[..., 0], arrays["val_images"])
    only_train = {k: v for k, v in arrays.items() if k.startswith("train")}
    np.savez(tmp_path / "train_only.npz", **only_train)
    splits = data.resolve_splits(tmp_path / "train_only.npz", val_fraction=0.25)
    assert (len(splits.train), len(splits.val), splits.test) == (15, 5, None)
    folder = data.resolve_splits(tiny_folder, val_fraction=0.25)
    assert (len(folder.train), len(folder.val), folder.test) == (24, 12, None)  # its own val/ folder


def test_image_data_in_another_class_order_is_refused():
    source = data.from_arrays(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]), class_names=["normal", "abnormal"])
    assert data.as_image_data(source, class_names=["normal", "abnormal"]) is source
    with pytest.raises(ValueError, match=r"\['normal', 'abnormal'\] are not the model's \['abnormal', 'normal'\]"):
        data.as_image_data(source, class_names=["abnormal", "normal"])


def test_a_hash_in_a_file_name_is_an_ordinary_character(tmp_path):
    """Only ``volume.nii[.gz]#<slice>`` selects a NIfTI slice; ``photo#1.jpg`` is a photo."""
    from restransfer.data.medical import split_slice

    for name in ("photo#1.jpg", "scan #2.png", "a#b#c.png"):
        write_image(tmp_path / "x" / name, np.full((8, 8, 3), 100, np.uint8))
    source = data.image_folder(tmp_path, progress=False)
    assert not source.skipped and len(source) == 3
    assert split_slice("brain.nii.gz#40") == ("brain.nii.gz", 40)
    assert split_slice(str(tmp_path / "x" / "photo#1.jpg")) == (str(tmp_path / "x" / "photo#1.jpg"), None)


def test_16_bit_files_keep_their_levels_through_recipes_and_the_pipeline(tmp_path):
    """A 12-bit scan stored in 16-bit PNGs (0..4095): with keep_precision 'auto' (the default)
    and a medical normalisation, the pipeline's pixels keep thousands of levels, not the 17
    that 8-bit rounding leaves."""
    from PIL import Image

    import restransfer as rt

    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    for label in ("a", "b"):
        for i in range(2):
            (tmp_path / "scans" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ramp).save(tmp_path / "scans" / label / f"{i}.png")
    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=64, channels=1,
                                     positive_class="b", augmentation="none")
    train, _, _ = recipe._training_data(str(tmp_path / "scans"), str(tmp_path / "scans"))
    assert recipe.keep_precision is True and train.keep_precision
    images, _ = next(iter(recipe._pipeline(train, training=False)))
    assert len(np.unique(images.numpy())) > 1000
    assert images.numpy().max() == pytest.approx(255.0, abs=1.0)  # normalised: the 12 bits span 0-255
    plain = data.image_folder(tmp_path / "scans", channels=1, keep_precision=False, progress=False)
    assert len(np.unique(data.load_image(plain.paths[0], 1, False))) <= 17  # what rounding kept before
