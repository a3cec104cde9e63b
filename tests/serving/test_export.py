"""SavedModel export: layout, signatures as TF Serving sees them, REST bodies, safety."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import restransfer as rt
from restransfer.training.phases import Phase


@pytest.fixture(scope="module")
def recipe():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(16) % 3
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=8,
                                     phases=[Phase("head", epochs=1, lr=1e-2)], augmentation="none",
                                     class_names=["cat", "dog", "fox"], val_fraction=0)
    recipe.fit((images, labels), verbose=0)
    return recipe


def encode(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(recipe, tmp_path_factory):
    """One export (top_k 2) for the tests that only read it."""
    return recipe.export(tmp_path_factory.mktemp("exported"), top_k=2)


def test_layout_versions_and_no_overwrite(recipe, tmp_path):
    first = recipe.export(tmp_path, model_name="pets", top_k=2)
    assert first == tmp_path / "pets" / "1"
    for name in ("saved_model.pb", "variables/variables.index", "assets/labels.txt",
                 "assets.extra/tf_serving_warmup_requests", "assets.extra/model_card.json"):
        assert (first / name).exists(), name
    assert (first / "assets" / "labels.txt").read_text().split() == ["cat", "dog", "fox"]
    assert recipe.export(tmp_path, model_name="pets").name == "2"
    with pytest.raises(FileExistsError):
        recipe.export(tmp_path, model_name="pets", version=1)
    card = json.loads((first / "assets.extra" / "model_card.json").read_text())
    assert card["backbone"] == "resnet18" and card["classes"] == ["cat", "dog", "fox"]
    assert str(Path.home()) not in json.dumps(card) and str(tmp_path) not in json.dumps(card)


def test_interrupted_export_leaves_no_version(recipe, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("restransfer.serving.export.write_warmup_requests", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        recipe.export(tmp_path, model_name="pets")
    assert list((tmp_path / "pets").iterdir()) == []


def test_signatures_match_the_keras_model(recipe, exported):
    export_dir = exported
    loaded = tf.saved_model.load(str(export_dir))
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8),
              rng.integers(0, 255, (33, 33, 3), dtype=np.uint8)]
    gray = rng.integers(0, 255, (40, 30), dtype=np.uint8)
    batch = [encode(photos[0], "PNG"), encode(photos[1], "JPEG", quality=95), encode(gray, "PNG")]
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(batch))
    assert out["probabilities"].shape == (3, 3)
    assert out["class_ids"].shape == (3, 2) and out["scores"].shape == (3, 2)
    names = out["class_names"].numpy().astype(str)
    np.testing.assert_array_equal(names, np.array(["cat", "dog", "fox"])[out["class_ids"].numpy()])
    # PNG is lossless: same pixels through the serving graph and through Keras
    expected = recipe.predict(photos[0][None])
    np.testing.assert_allclose(out["probabilities"].numpy()[0], expected[0], atol=1e-5)
    gray_rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_allclose(out["probabilities"].numpy()[2], recipe.predict(gray_rgb[None])[0], atol=1e-5)
    raw = loaded.signatures["predict_images"](images=tf.constant(photos[1][None].astype("float32")))
    np.testing.assert_allclose(raw["probabilities"].numpy(), recipe.predict(photos[1][None]), atol=1e-5)


def test_the_export_holds_the_models_weights_and_no_training_state(recipe, exported):
    """A served model carries its weights (BatchNorm statistics included), not the optimizer's
    moments: Adam's two per weight had made a ResNet-18 export 129 MB instead of 43 MB."""
    saved = {name: shape for name, shape in tf.train.list_variables(str(exported / "variables" / "variables"))
             if name.endswith("VARIABLE_VALUE")}
    assert recipe.model.optimizer.variables, "the fixture's model has an optimizer state to leave out"
    assert sorted(map(tuple, saved.values())) == sorted(tuple(v.shape) for v in recipe.model.variables), \
        [name for name in saved if "optimizer" in name][:5]


def test_rest_body_decoded_the_way_serving_does(recipe, exported):
    export_dir = exported
    image = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    body = json.dumps({"signature_name": "serving_default",
                       "instances": [{"b64": base64.b64encode(encode(image, "PNG")).decode()}]})
    # TF Serving's REST layer: each {"b64": ...} becomes one DT_STRING element (standard base64).
    instances = json.loads(body)["instances"]
    strings = tf.constant([base64.standard_b64decode(item["b64"]) for item in instances])
    out = tf.saved_model.load(str(export_dir)).signatures["serving_default"](image_bytes=strings)
    np.testing.assert_allclose(out["probabilities"].numpy(), recipe.predict(image[None]), atol=1e-5)


def test_saved_model_cli_shows_what_serving_sees(exported):
    export_dir = exported
    cli = Path(sys.executable).with_name("saved_model_cli")
    shown = subprocess.run([str(cli), "show", "--dir", str(export_dir), "--all"],
                           capture_output=True, text=True, check=True).stdout
    assert "signature_def['serving_default']" in shown and "signature_def['predict_images']" in shown
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in shown
    assert "inputs['images'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, -1, -1, 3)" in shown
    for output in ("probabilities", "class_ids", "class_names", "scores"):
        assert f"outputs['{output}']" in shown


def test_warmup_requests_are_prediction_logs(recipe, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    images = [np.full((20, 20, 3), v, np.uint8) for v in (10, 200)]
    export_dir = recipe.export(tmp_path, model_name="pets", warmup_images=images)
    records = list(tf.data.TFRecordDataset(str(export_dir / "assets.extra" / "tf_serving_warmup_requests")))
    assert len(records) == 2
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    assert log.predict_log.request.model_spec.name == "pets"
    assert log.predict_log.request.model_spec.signature_name == "serving_default"
    encoded = tf.make_ndarray(log.predict_log.request.inputs["image_bytes"])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), images[0])


def test_non_image_bytes_fail_that_request_only(exported):
    signature = tf.saved_model.load(str(exported)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        signature(image_bytes=tf.constant([b"not an image"]))
    good = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    assert signature(image_bytes=tf.constant([good]))["probabilities"].shape == (1, 3)


def test_multi_label_export_applies_thresholds(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=8,
                                     phases=[Phase("head", epochs=1, lr=1e-2)], augmentation="none",
                                     multi_label=True, class_names=["a", "b"], val_fraction=0)
    recipe.fit((images, rng.integers(0, 2, (8, 2)).astype("float32")), verbose=0)
    export_dir = recipe.export(tmp_path, thresholds=[0.0, 1.01])
    out = tf.saved_model.load(str(export_dir)).signatures["predict_images"](images=tf.constant(images[:2], tf.float32))
    np.testing.assert_array_equal(out["predictions"].numpy(), [[1, 0], [1, 0]])
