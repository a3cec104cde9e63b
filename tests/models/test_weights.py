"""Weight loading: torchvision parity, Keras files, and clear errors offline."""

import sys

import numpy as np
import pytest

import restransfer as rt
from restransfer.models.weights import WeightsNotAvailable, read_torchvision_state_dict

from conftest import PARITY, STANDIN_WEIGHTS, require_shared


def relative_error(ours, reference):
    # The shared fixtures' measure: max|keras - torchvision| / max|torchvision|.
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def check_parity(name, weights_path, tolerance=1e-4):
    images = np.load(require_shared(PARITY / "images_uint8.npy"))
    model = rt.build_backbone(name, weights=weights_path, input_shape=images.shape[1:])
    features = model.predict(images.astype("float32"), verbose=0)
    assert relative_error(features, np.load(PARITY / f"{name}_features.npy")) <= tolerance
    state = read_torchvision_state_dict(weights_path)
    logits = features @ state["fc.weight"].T + state["fc.bias"]
    assert relative_error(logits, np.load(PARITY / f"{name}_logits.npy")) <= tolerance


def test_resnet50_safetensors_matches_torchvision_without_torch():
    check_parity("resnet50", require_shared(PARITY / "resnet50_random.safetensors"))


def test_resnet18_pth_matches_torchvision_without_torch():
    check_parity("resnet18", require_shared(STANDIN_WEIGHTS), tolerance=1e-5)
    assert "torch" not in sys.modules  # read by restransfer's own restricted unpickler


def test_torchvision_file_of_another_depth_is_refused_with_the_key(tmp_path):
    weights = require_shared(PARITY / "resnet50_random.safetensors")
    with pytest.raises(WeightsNotAvailable, match="resnet101.*layer3"):
        rt.build_backbone("resnet101", weights=weights, input_shape=(32, 32, 3))


def test_keras_weight_files_round_trip(tmp_path):
    source = rt.build_backbone("resnet18", input_shape=(32, 32, 3))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    source.save_weights(tmp_path / "bb.weights.h5")
    source.save(tmp_path / "bb.keras")
    for path in (tmp_path / "bb.weights.h5", tmp_path / "bb.keras"):
        loaded = rt.build_backbone("resnet18", weights=path, input_shape=(32, 32, 3))
        np.testing.assert_allclose(loaded(x), source(x), atol=1e-6)


def test_keras_preset_offline_failure_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x: None -- offline")

    # keras.applications' real download/cache path, with the network cut at get_file.
    monkeypatch.setattr("keras.src.applications.resnet.file_utils.get_file", offline)
    with pytest.raises(WeightsNotAvailable) as caught:
        rt.build_backbone("resnet50", weights="keras", input_shape=(32, 32, 3))
    message = str(caught.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras_home" / "models") in message
    assert "KERAS_HOME" in message


def test_a_preset_another_depth_has_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="weights preset for resnet18 'keras'.*imagenet.*torchvision_v1"):
        rt.build_backbone("resnet18", weights="keras")


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        rt.build_backbone("resnet18", weights=tmp_path / "nope.pth")
