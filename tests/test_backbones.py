"""The backbone contract, once over every backbone in the registry."""

import keras
import numpy as np
import pytest

import restransfer as rt
from restransfer import stages

ALL = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
       "resnet50v2", "resnet101v2", "resnet152v2"]


def test_registry_lists_all_eight():
    assert rt.list_backbones() == ALL


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        rt.build_backbone("resnet05")


@pytest.mark.parametrize("name", ALL)
def test_backbone_contract(name):
    spec = rt.backbones.get_spec(name)
    model = rt.build_backbone(name, weights=None, input_shape=(32, 32, 3), pooling="avg")
    assert model.name == name
    assert model.output_shape == (None, spec.feature_dim)
    assert model.count_params() == spec.params, "registry's params column is the real count"
    groups = stages.stage_layers(model)
    assert list(groups) == list(rt.STAGES)
    assert all(groups[s] for s in rt.STAGES), "every stage holds layers"
    # every weight of the network belongs to exactly one stage
    staged = {id(w) for layers in groups.values() for layer in layers for w in layer.weights}
    assert staged == {id(w) for w in model.weights}
    # stage4 ends in the network's last feature map
    conv_names = [layer.name for layer in groups["stage4"]]
    assert conv_names[-1] in ("conv5_block%d_out" % spec.depths[3], "post_relu")

    rt.freeze(model, up_to="stage3")
    trainable = {id(w) for w in model.trainable_weights}
    stage4 = {id(w) for layer in groups["stage4"] for w in layer.trainable_weights}
    assert trainable == stage4 and stage4
    assert stages.trainable_stages(model) == ["stage4"]
    rt.unfreeze(model, "stage3")
    assert stages.trainable_stages(model) == ["stage3", "stage4"]
    rt.unfreeze(model, "all")
    assert len(model.trainable_weights) == sum(len(l.trainable_weights) for l in model.layers)
    assert stages.trainable_stages(model) == list(rt.STAGES)


def test_preprocessing_is_inside_the_model():
    caffe = rt.build_backbone("resnet50", input_shape=(32, 32, 3)).get_layer("preprocess")
    v2 = rt.build_backbone("resnet50v2", input_shape=(32, 32, 3)).get_layer("preprocess")
    torch_style = rt.build_backbone("resnet18", input_shape=(32, 32, 3)).get_layer("preprocess")
    pixel = np.full((1, 1, 1, 3), 255.0, np.float32)
    np.testing.assert_allclose(caffe(pixel)[0, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-5)
    np.testing.assert_allclose(v2(pixel)[0, 0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(torch_style(pixel)[0, 0, 0],
                               [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-5)


def test_grayscale_input_is_replicated_to_rgb():
    model = rt.build_backbone("resnet18", input_shape=(32, 32, 1))
    gray = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 1)).astype("float32")
    rgb_model = rt.build_backbone("resnet18", input_shape=(32, 32, 3))
    rgb_model.set_weights(model.get_weights())
    np.testing.assert_allclose(model(gray), rgb_model(np.repeat(gray, 3, axis=-1)), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50v2"])
def test_frozen_stages_keep_batchnorm_statistics_in_a_train_step(name):
    backbone = rt.build_backbone(name, input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)))
    rt.freeze(model, up_to="stage3")
    groups = stages.stage_layers(model)
    bn = lambda stage: [l for l in groups[stage] if isinstance(l, keras.layers.BatchNormalization)]
    frozen_before = [np.copy(w) for l in bn("stage2") for w in l.get_weights()]
    live_before = [np.copy(w) for l in bn("stage4") for w in l.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    model.train_on_batch(x, np.array([0, 1, 0, 1]))
    frozen_after = [w for l in bn("stage2") for w in l.get_weights()]
    live_after = [w for l in bn("stage4") for w in l.get_weights()]
    for before, after in zip(frozen_before, frozen_after):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(live_before, live_after))


def test_train_bn_keeps_batchnorm_of_frozen_stages_trainable():
    model = rt.build_backbone("resnet18", input_shape=(32, 32, 3))
    rt.freeze(model, up_to="stage4", train_bn=True)
    trainable = {l.name for l in model.layers if l.trainable_weights}
    assert trainable and all(name.endswith("_bn") for name in trainable)


def test_stage_spec_errors_name_the_spec():
    with pytest.raises(ValueError, match="stage9"):
        stages.parse_stages("stage9+")
    assert stages.parse_stages("stage3+") == ["stage3", "stage4"]
    assert stages.parse_stages("head") == []
