"""One image contract through every door, on original files (never re-encodes of decoded
pixels): the training pipeline, ``recipe.predict(path)``, a reloaded recipe, the CLI's
``predict``, and the exported SavedModel's ``serving_default(bytes)`` and
``predict_images(decoded)`` give the same probabilities for every kind of file users send."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

import restransfer as rt
from restransfer import data


TOLERANCE = 1e-5


def _save(path, image, fmt, **options):
    image.save(path, format=fmt, **options)
    return path


def build_corpus(folder):
    """Every kind of file the issue names, written by Pillow as phones, scanners and editors do."""
    folder.mkdir(parents=True, exist_ok=True)
    # smooth content (a gradient + blobs), so resizing and JPEG behave as on photos
    y, x = np.mgrid[0:48, 0:64]
    photo = np.stack([x * 4, y * 5, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)
    photo[10:20, 5:25] = [250, 30, 30]
    corpus = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        corpus[f"exif{orientation}.jpg"] = _save(folder / f"exif{orientation}.jpg", Image.fromarray(photo),
                                                 "JPEG", exif=exif, quality=92)
    alpha = np.where(x < 32, 0, 255).astype(np.uint8)
    corpus["rgba.png"] = _save(folder / "rgba.png", Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG")
    corpus["la.png"] = _save(folder / "la.png", Image.fromarray(np.dstack([photo[..., 0], alpha]), "LA"), "PNG")
    palette = Image.fromarray(photo).quantize(16)
    corpus["palette.png"] = _save(folder / "palette.png", palette, "PNG",
                                  transparency=int(np.asarray(palette)[0, 0]))
    corpus["gray16.png"] = _save(folder / "gray16.png", Image.fromarray((x * 1000 + y * 7).astype(np.uint16)), "PNG")
    corpus["gray.jpg"] = _save(folder / "gray.jpg", Image.fromarray(photo).convert("L"), "JPEG")
    corpus["cmyk.jpg"] = _save(folder / "cmyk.jpg", Image.fromarray(photo).convert("CMYK"), "JPEG")
    corpus["progressive.jpg"] = _save(folder / "progressive.jpg", Image.fromarray(photo), "JPEG", progressive=True)
    trailing = folder / "trailing.jpg"
    trailing.write_bytes(corpus["exif1.jpg"].read_bytes() + b"\x00trailing bytes after EOI" * 3)
    corpus["trailing.jpg"] = trailing
    corpus["image.bmp"] = _save(folder / "image.bmp", Image.fromarray(photo), "BMP")
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
    corpus["animated.gif"] = _save(folder / "animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    corpus["image.webp"] = _save(folder / "image.webp", Image.fromarray(photo), "WEBP", quality=90)
    corpus["image.tiff"] = _save(folder / "image.tiff", Image.fromarray(photo), "TIFF")
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "gray"])
def exported(request, tmp_path_factory, corpus):
    """A ResNet-18 with a random head (two heads: one per channel count), saved and exported."""
    out = tmp_path_factory.mktemp(f"model{request.param}")
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=64, channels=request.param,
                                     class_names=["a", "b", "c"], seed=request.param)
    recipe.build()
    path = recipe.save(out / "model.keras")
    served = [p for name, p in corpus.items() if name != "image.tiff"]
    export_dir = recipe.export(out / "export", warmup_images=served[:3])
    return recipe, path, tf.saved_model.load(str(export_dir)), export_dir


def test_the_decoder_agrees_with_pillow_on_what_the_pixels_are(corpus):
    # the contract's meaning, checked against an independent decoder (Pillow): orientation,
    # transparency on white, first GIF frame; JPEG decoders may differ by a few levels
    for name, path in corpus.items():
        if name in ("gray16.png",):
            continue
        ours = data.load_image(path).astype(int)
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image).convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            reference = np.asarray(Image.alpha_composite(white, image).convert("RGB")).astype(int)
        assert ours.shape == reference.shape, name
        assert np.abs(ours - reference).max() <= (6 if name.endswith(".jpg") else 1), name
    sixteen = data.load_image(corpus["gray16.png"], keep_precision=True)
    raw = np.asarray(Image.open(corpus["gray16.png"]), dtype=np.float64)
    np.testing.assert_allclose(sixteen[..., 0], raw * 255 / 65535, atol=1e-3)


def test_every_door_gives_the_same_probabilities_on_original_files(exported, corpus):
    recipe, model_path, saved, _ = exported
    reloaded = rt.ClassificationRecipe.load(model_path)
    for name, path in corpus.items():
        by_path = recipe.predict([path])[0]
        np.testing.assert_allclose(reloaded.predict([path])[0], by_path, atol=TOLERANCE, err_msg=name)
        decoded = data.load_image(path, recipe.channels)
        by_pixels = saved.signatures["predict_images"](images=tf.constant(decoded[None], tf.float32))
        np.testing.assert_allclose(by_pixels["probabilities"].numpy()[0], by_path, atol=TOLERANCE, err_msg=name)
        encoded = tf.constant([path.read_bytes()])
        if name == "image.tiff":  # not a served format: refused by the signature, said in the card
            with pytest.raises(tf.errors.InvalidArgumentError):
                saved.signatures["serving_default"](image_bytes=encoded)
            continue
        by_bytes = saved.signatures["serving_default"](image_bytes=encoded)["probabilities"].numpy()[0]
        np.testing.assert_allclose(by_bytes, by_path, atol=TOLERANCE, err_msg=name)


def test_the_training_pipeline_decodes_as_predict_does(exported, corpus, tmp_path):
    recipe = exported[0]
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    names = sorted(corpus)
    for name in names:
        (folder / name).write_bytes(corpus[name].read_bytes())
    source = data.image_folder(tmp_path / "folder", class_names=recipe.class_names, channels=recipe.channels,
                               progress=False)
    assert not source.skipped and len(source) == len(names)
    by_pipeline = recipe.predict_dataset(source)
    by_path = recipe.predict([folder / name for name in names])
    np.testing.assert_allclose(by_pipeline, by_path, atol=TOLERANCE)


def test_the_model_card_states_the_contract(exported):
    card = json.loads((exported[3] / "assets.extra" / "model_card.json").read_text())
    text = json.dumps(card["input"])
    for phrase in ("JPEG", "PNG", "WebP", "EXIF orientation", "white", "TIFF", "predict_images"):
        assert phrase in text, phrase


def test_cli_predict_is_the_same_door(exported, corpus, capsys):
    from restransfer import cli

    recipe, model_path, _, _ = exported
    files = [str(corpus[name]) for name in ("exif6.jpg", "rgba.png", "image.tiff")]
    assert cli.main(["predict", str(model_path), *files, "--json", "--top-k", "3"]) == 0
    for item, path in zip(json.loads(capsys.readouterr().out)["results"], files):
        expected = recipe.predict([path])[0]
        np.testing.assert_allclose([item["probabilities"][name] for name in recipe.class_names], expected,
                                   atol=TOLERANCE)


def test_a_16_bit_medical_model_decodes_the_same_levels_in_every_door(tmp_path):
    """16-bit PNGs holding 12 bits (0..4095): predict(path), a reloaded recipe and the SavedModel
    (decoding in its graph, normalising by the same percentiles) agree; the pixels are full
    precision, not 17 grey levels."""
    y, x = np.mgrid[0:40, 0:48]
    files = []
    for i in range(3):
        scan = ((x * 60 + y * 31 + i * 700) % 4096).astype(np.uint16)
        files.append(_save(tmp_path / f"scan{i}.png", Image.fromarray(scan), "PNG"))
    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32, channels=1,
                                     class_names=["normal", "lesion"], positive_class="lesion", seed=1)
    recipe.keep_precision = True  # what "auto" resolves to for these files (tests/data: test_16_bit...)
    recipe.build()
    pixels = data.load_image(files[0], 1, True, **recipe.decode_options)
    assert len(np.unique(pixels)) > 1000 and pixels.max() == pytest.approx(255.0, abs=0.5)
    export_dir = recipe.export(tmp_path / "export", warmup_images=files)  # refused unless bytes agree
    card = json.loads((export_dir / "assets.extra" / "model_card.json").read_text())
    assert "16-bit PNGs' intensities mapped to 0-255 by their percentile range" in card["input"]["serving_default"]
    served = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    by_bytes = served(image_bytes=tf.constant([p.read_bytes() for p in files]))["probabilities"].numpy()
    np.testing.assert_allclose(by_bytes, recipe.predict(files), atol=TOLERANCE)
    reloaded = rt.MedicalImagingRecipe.load(recipe.save(tmp_path / "m.keras"))
    assert reloaded.keep_precision is True
    np.testing.assert_allclose(reloaded.predict(files), by_bytes, atol=TOLERANCE)
