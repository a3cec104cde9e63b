"""The backbone contract, once over every backbone in the registry."""

import keras
import numpy as np
import pytest

import restransfer as rt
from restransfer.models import stages
from restransfer.models.registry import get_spec

ALL = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
       "resnet50v2", "resnet101v2", "resnet152v2"]


def test_registry_lists_all_eight():
    assert rt.list_backbones() == ALL


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        rt.build_backbone("resnet05")


@pytest.mark.parametrize("name", ALL)
def test_backbone_contract(name):
    spec = get_spec(name)
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


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_one_channel_stem_equals_replicating_gray_to_rgb(name, tmp_path):
    # pretrained-like RGB weights whose three input channels differ
    rgb = rt.build_backbone(name, input_shape=(32, 32, 3))
    rgb.save_weights(tmp_path / "rgb.weights.h5")
    replicate = rt.build_backbone(name, weights=tmp_path / "rgb.weights.h5", input_shape=(32, 32, 1))
    summed = rt.build_backbone(name, weights=tmp_path / "rgb.weights.h5", input_shape=(32, 32, 1), stem="sum")
    assert summed.get_layer("conv1_conv").kernel.shape[2] == 1
    np.testing.assert_allclose(summed.get_layer("conv1_conv").kernel.numpy(),
                               rgb.get_layer("conv1_conv").kernel.numpy().sum(axis=2, keepdims=True))
    gray = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    a, b = replicate(gray).numpy(), summed(gray).numpy()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_gray_inputs_use_channel_averaged_statistics():
    layer = rt.build_backbone("resnet18", input_shape=(32, 32, 1)).get_layer("preprocess")
    out = layer(np.full((1, 1, 1, 1), 255.0, np.float32)).numpy()[0, 0, 0]
    expected = (1 - np.mean([0.485, 0.456, 0.406])) / np.mean([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, [expected] * 3, rtol=1e-5)


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


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_layout_pads_apart_only_where_keras_same_would_differ(name):
    """A separate pad copies the activation forward and slices its gradient backward: in the
    torchvision layout only the stride-2 convolutions and the stem's pooling keep one (there
    Keras' "same" pads asymmetrically); a stride-1 3x3 conv pads inside itself (ResNet-18
    trained ~12 % faster at 128 px on 2 cores, bench/RESULTS.md)."""
    model = rt.build_backbone(name, weights=None, input_shape=(64, 64, 3), pooling=None, layout="torchvision")
    padded = {layer.name[: -len("_pad")] for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)}
    strided = {layer.name[: -len("_conv")] for layer in model.layers
               if isinstance(layer, keras.layers.Conv2D) and layer.strides == (2, 2) and layer.kernel_size != (1, 1)}
    assert padded == strided | {"pool1"}
    # and "same" at stride 1 is torchvision's symmetric padding: equal to pad-then-valid
    conv = model.get_layer("conv2_block1_2_conv" if name == "resnet50" else "conv2_block1_1_conv")
    assert conv.padding == "same" and conv.strides == (1, 1)
    x = np.random.default_rng(0).normal(size=(1, 9, 7, conv.kernel.shape[2])).astype("float32")
    valid = keras.ops.conv(keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), conv.kernel, padding="valid")
    np.testing.assert_allclose(conv(x), valid, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_batchnorm_computes_what_keras_batchnorm_computes(training, precision):
    """Backbones and decoders use FusedBatchNormalization (one TensorFlow kernel instead of
    Keras' element-wise ops: a ResNet-18 step's graph 2,871 -> 1,791 ops). Outputs, gradients
    and the moving statistics it keeps must be Keras' own, training and frozen, in float32 and
    under the GPU default (mixed_float16, run here on the CPU)."""
    import tensorflow as tf

    from restransfer.models.batchnorm import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.0, 3.0, (4, 9, 7, 16)).astype("float32"))
    weights = [rng.normal(size=16).astype("float32") for _ in range(3)] + [rng.uniform(0.5, 2, 16).astype("float32")]
    results = []
    for layer_class in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = layer_class(epsilon=1e-5, momentum=0.9, dtype=precision)
        layer.build(x.shape)
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x, training=training), tf.float32)
            loss = tf.reduce_sum(y * tf.sin(y))
        grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        results.append((y.numpy(), [g.numpy() for g in grads], layer.get_weights()))
    (y_keras, g_keras, w_keras), (y_fused, g_fused, w_fused) = results
    tolerance = 1e-5 if precision == "float32" else 5e-3  # float16 outputs: ~3 decimal digits
    np.testing.assert_allclose(y_fused, y_keras, rtol=tolerance, atol=tolerance)
    for mine, theirs in zip(g_fused, g_keras):
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(mine / scale, theirs / scale, atol=tolerance * 10)
    for mine, theirs in zip(w_fused, w_keras):  # moving mean and (biased) variance as Keras keeps them
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    if training:
        assert not np.allclose(w_keras[2], weights[2]), "the moving statistics moved"
    model = rt.build_backbone("resnet18", weights=None, input_shape=(32, 32, 3))
    assert all(type(layer) is FusedBatchNormalization for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization))
