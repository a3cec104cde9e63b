"""Fine-tuning machinery: per-stage rates, schedules, presets, BN policy, LR finder."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import restransfer as rt
from restransfer.models import stages
from restransfer.training.lr_finder import find_lr
from restransfer.training.phases import Phase, default_phases, preset
from restransfer.training.optimizers import lr_multipliers, make_optimizer
from restransfer.training.schedules import OneCycle, learning_rate
from restransfer.models.heads import ClassifierHead
from restransfer.training.objectives import ClassificationObjective, compile_model

from conftest import bright_dark_folder


def tiny_model():
    backbone = rt.build_backbone("resnet18", input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    head = ClassifierHead(2, name="head")
    return keras.Model(inputs, head(backbone(inputs)))


def one_step(model, phase):
    stages.set_trainable_stages(model, stages.parse_stages(phase.trainable))
    optimizer = make_optimizer(model, phase, steps_per_epoch=1)
    variables = model.trainable_variables
    optimizer.build(variables)
    before = [np.copy(v.numpy()) for v in variables]
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(np.array([0, 1, 0, 1]), model(x, training=False))
    grads = tape.gradient(loss, variables)
    optimizer.apply(grads, variables)
    return {v.path: (b, v.numpy(), g.numpy()) for v, b, g in zip(variables, before, grads)}


def pick(result, model, stage):
    layer = next(l for l in stages.stage_layers(model)[stage] if isinstance(l, keras.layers.Conv2D))
    return result[layer.kernel.path]


def test_sgd_step_uses_each_stages_rate_exactly():
    model = tiny_model()
    phase = Phase("all", lr=0.1, lr_mult=0.5, optimizer="sgd", schedule="constant")
    # first Nesterov step (momentum 0.9, empty history): delta = -(1 + 0.9) * lr_stage * grad
    result = one_step(model, phase)
    for stage, expected in phase.stage_learning_rates().items():
        before, after, grad = pick(result, model, stage)
        np.testing.assert_allclose(before - after, 1.9 * expected * grad, rtol=1e-3, atol=1e-8)
    head_kernel = model.get_layer("head").classifier.kernel.path
    before, after, grad = result[head_kernel]
    np.testing.assert_allclose(before - after, 1.9 * 0.1 * grad, rtol=1e-3, atol=1e-8)
    assert phase.stage_learning_rates()["stem"] == pytest.approx(0.1 * 0.5 ** 5)


def test_adam_first_step_moves_each_stage_by_its_rate():
    model = tiny_model()
    phase = Phase("all", lr=1e-2, stage_lrs={"stage4": 1e-3, "stage1": 1e-5}, schedule="constant")
    result = one_step(model, phase)
    for stage, rate in (("stage4", 1e-3), ("stage1", 1e-5), ("stage2", 1e-2)):
        before, after, grad = pick(result, model, stage)
        moved = np.abs(before - after)[np.abs(grad) > 1e-6]
        # Adam's first step is lr * g/(|g|+eps) ~ lr for every non-tiny gradient
        assert np.median(moved) == pytest.approx(rate, rel=0.05), stage


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_the_fused_adam_update_is_keras_adam_and_one_kernel_per_variable(optimizer):
    """StageRateAdam updates each variable with TensorFlow's fused ResourceApplyAdam (a
    training step's graph was half optimizer ops, traced anew each phase); over three steps,
    traced and eager, it must move the weights as Keras' own Adam/AdamW at the same rates."""
    from restransfer.training.optimizers import StageRateAdam, StageRateAdamW

    rng = np.random.default_rng(0)
    shapes = [(3, 3, 4, 8), (8,), (16, 2)]
    start = [rng.normal(size=shape).astype("float32") for shape in shapes]
    grads = [[rng.normal(size=shape).astype("float32") for shape in shapes] for _ in range(3)]
    options = dict(learning_rate=0.01, weight_decay=0.1) if optimizer == "adamw" else dict(learning_rate=0.01)
    ours_class, keras_class = ((StageRateAdamW, keras.optimizers.AdamW) if optimizer == "adamw"
                               else (StageRateAdam, keras.optimizers.Adam))

    def run(make, traced):
        variables = [keras.Variable(value, name=f"w{i}") for i, value in enumerate(start)]
        opt = make(variables)
        opt.build(variables)
        step = (lambda g: opt.apply(g, variables))
        step = tf.function(step) if traced else step
        for g in grads:
            step([tf.constant(x) for x in g])
        return [v.numpy() for v in variables], opt

    # the third variable at half the rate: Keras' own Adam then gets it as a second optimizer
    ours, fused = run(lambda v: ours_class(lr_multipliers={v[2].path: 0.5}, **options), traced=True)
    eager, _ = run(lambda v: ours_class(lr_multipliers={v[2].path: 0.5}, **options), traced=False)
    reference, _ = run(lambda v: keras_class(**options), traced=False)
    half = dict(options, learning_rate=0.005, weight_decay=0.2) if optimizer == "adamw" else dict(learning_rate=0.005)
    halved = [keras.Variable(start[2])]
    opt = keras_class(**half)
    opt.build(halved)
    for g in grads:
        opt.apply([tf.constant(g[2])], halved)
    reference[2] = halved[0].numpy()
    for mine, again, theirs in zip(ours, eager, reference):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(again, theirs, rtol=1e-5, atol=1e-7)
    # one kernel per variable in the traced update, not Keras' ~40 ops
    variables = [keras.Variable(value) for value in start]
    fused = ours_class(**options)
    fused.build(variables)
    graph = tf.function(lambda g: fused.apply(g, variables)).get_concrete_function(
        [tf.TensorSpec(shape, tf.float32) for shape in shapes]).graph
    kinds = [op.type for op in graph.get_operations()]
    assert kinds.count("ResourceApplyAdam") == len(shapes)
    assert kinds.count("AssignSubVariableOp") == (len(shapes) if optimizer == "adamw" else 0)  # the decay only


def test_multipliers_cover_only_trainable_stages():
    model = tiny_model()
    stages.set_trainable_stages(model, ["stage4"])
    multipliers = lr_multipliers(model, Phase("stage4", lr=1.0, lr_mult=0.1))
    assert multipliers and all(v == pytest.approx(0.1) for v in multipliers.values())
    assert all("conv5" in path for path in multipliers)


def test_schedule_values_at_given_steps():
    cycle = OneCycle(1.0, total_steps=100)
    assert float(cycle(0)) == pytest.approx(1 / 25)
    assert float(cycle(30)) == pytest.approx(1.0)
    assert float(cycle(100)) == pytest.approx(1e-4, rel=1e-3)
    step = learning_rate(Phase("all", epochs=6, lr=1.0, schedule="step", step_epochs=2, step_gamma=0.5), 10)
    assert [float(step(s)) for s in (0, 20, 21, 45)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    cosine = learning_rate(Phase("all", epochs=2, lr=0.1, schedule="cosine", warmup_epochs=1), 10)
    assert [float(cosine(s)) for s in (0, 10, 20)] == pytest.approx([0.0, 0.1, 0.0], abs=1e-6)
    constant = learning_rate(Phase("all", epochs=2, lr=0.1, schedule="constant", warmup_epochs=1), 10)
    assert [float(constant(s)) for s in (5, 19)] == pytest.approx([0.05, 0.1])


def test_schedule_state_survives_a_checkpoint(tmp_path):
    model = tiny_model()
    phase = Phase("head", lr=1.0, schedule="one_cycle", epochs=1)
    optimizer = make_optimizer(model, phase, steps_per_epoch=100)
    compile_model(model, optimizer, multi_label=False)
    x = np.zeros((2, 32, 32, 3), "float32")
    y = np.eye(2, dtype="float32")
    for _ in range(3):
        model.train_on_batch(x, y)
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert int(restored.optimizer.iterations) == 3
    assert float(restored.optimizer.learning_rate) == pytest.approx(float(OneCycle(1.0, 100)(3)))


def test_presets():
    assert [p.trainable for p in preset("gradual", epochs=5)] == ["head", "stage4", "stage3+", "stage2+", "all"]
    guide = preset("keras_guide", epochs=4)
    assert [(p.trainable, p.epochs, p.lr) for p in guide] == [("head", 2, 1e-3), ("all", 2, 1e-5)]
    assert sum(p.epochs for p in preset("two_phase", epochs=8)) == 8
    assert [p.lr_mult for p in preset("two_phase", epochs=8, lr_mult=0.6)] == [1.0, 0.6]
    with pytest.raises(ValueError, match="unknown fine-tuning preset"):
        preset("fastest")


def test_phase_validation_names_the_field():
    with pytest.raises(ValueError, match="lr"):
        Phase("all", lr=-1)
    with pytest.raises(ValueError, match="stage7"):
        Phase("stage7")
    with pytest.raises(ValueError, match="unknown stage 'stage9'"):
        Phase("all", stage_lrs={"stage9": 1e-3})


def test_train_bn_policy_updates_frozen_batchnorm():
    model = tiny_model()
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    bn = next(l for l in stages.stage_layers(model)["stage1"] if isinstance(l, keras.layers.BatchNormalization))
    for train_bn, changes in ((False, False), (True, True)):
        stages.set_trainable_stages(model, [], train_bn=train_bn)
        before = np.copy(bn.moving_mean.numpy())
        compile_model(model, keras.optimizers.SGD(0.01), multi_label=False)
        model.train_on_batch(x, np.eye(2, dtype="float32")[[0, 1, 0, 1]])
        assert (not np.allclose(before, bn.moving_mean.numpy())) == changes


def test_default_head_phase_adapts_batchnorm_but_keeps_convolutions(tiny_folder):
    """The default plan's first phase trains the head and the frozen backbone's BatchNorm
    (fastai's train_bn): statistics move toward the new images, convolution kernels do not."""
    head_phase = default_phases()[0]
    assert head_phase.trainable == "head"
    recipe = rt.ClassificationRecipe(
        backbone="resnet18", weights=None, class_names=["bright", "dark"], image_size=32, batch_size=8,
        augmentation="none", early_stopping_patience=None, phases=[head_phase.model_copy(update={"epochs": 1})])
    model = recipe.build()
    conv, bn = model.get_layer("resnet18").get_layer("conv1_conv"), model.get_layer("resnet18").get_layer("conv1_bn")
    kernel, moving_mean = np.copy(conv.kernel.numpy()), np.copy(bn.moving_mean.numpy())
    recipe.fit(tiny_folder, verbose=0)
    np.testing.assert_array_equal(conv.kernel.numpy(), kernel)
    assert not np.allclose(bn.moving_mean.numpy(), moving_mean)


def test_lr_finder_suggestions_on_a_known_curve():
    """A loss that falls fastest at 1e-3 (a logistic step in log-rate), is lowest at 1e-1 and
    then diverges: steepest must be 1e-3 and the valley a tenth of 1e-1."""
    from restransfer.training.lr_finder import suggestions

    rates = np.logspace(-6, 1, 141)
    log_rate = np.log10(rates)
    falling = 1.0 / (1.0 + np.exp(3.0 * (log_rate + 3.0)))  # fastest drop at 1e-3
    loss = 1.0 + falling + np.where(log_rate > -1, 10.0 * (log_rate + 1) ** 2, 0.0)  # minimum region ends at 1e-1
    steepest, valley = suggestions(list(rates), list(loss))
    assert steepest == pytest.approx(1e-3, rel=0.13)  # one grid step (10^0.05)
    assert valley == pytest.approx(1e-2, rel=0.13)


def test_lr_finder_restores_weights_and_stops_once_the_loss_diverges(tmp_path):
    model = tiny_model()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 127).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    weights = [np.copy(w) for w in model.get_weights()]
    result = find_lr(model, ds, Phase("all"), ClassificationObjective(2), steps=30, min_lr=1e-6, max_lr=10)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    losses = np.asarray(result.losses)
    # it stopped at the first loss above 4x the best (or ran all 30 steps): every earlier loss is below
    assert len(losses) == len(result.learning_rates) <= 30
    assert len(losses) == 30 or losses[-1] > 4 * losses[:-1].min() or not np.isfinite(losses[-1])
    assert (losses[:-1] <= 4 * np.minimum.accumulate(losses[:-1]) + 1e-6).all()
    # the suggestions lie where the loss had not yet blown up, below the rate of its minimum
    lowest = result.learning_rates[int(np.nanargmin(result.smoothed))]
    assert result.valley == pytest.approx(lowest / 10) and result.steepest <= lowest
    result.plot(tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1000


def test_lr_find_leaves_the_recipe_as_it_found_it(tiny_folder, tmp_path):
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=8,
                                     augmentation="none", phases=[Phase("all", epochs=1)])
    recipe.lr_find(tiny_folder, phase=0, steps=5)
    assert recipe.model is None, "a recipe without a model stays without one"
    model = recipe.build()
    before = [np.copy(w) for w in model.get_weights()]
    recipe.lr_find(tiny_folder, phase=0, steps=5)
    assert recipe.model is model and not model.compiled
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    saved = recipe.save(tmp_path / "after_lr_find.keras")  # failed: the sweep's schedule has no config
    assert rt.ClassificationRecipe.load(saved).class_names == recipe.class_names


def test_a_phases_smoothing_adamw_and_ema_reach_the_compiled_model(tiny_folder):
    recipe = rt.ClassificationRecipe(
        backbone="resnet18", weights=None, image_size=32, batch_size=8, augmentation="none",
        early_stopping_patience=None,
        phases=[Phase("all", epochs=1, lr=1e-3, label_smoothing=0.1, mixup=0.4, ema=True,
                      optimizer="adamw", weight_decay=1e-4)])
    history = recipe.fit(tiny_folder, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    loss, optimizer = recipe.model.loss, recipe.model.optimizer
    assert loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    assert type(optimizer).__name__ == "StageRateAdamW" and optimizer.weight_decay == pytest.approx(1e-4)
    assert optimizer.use_ema
    # smoothing changes the figure: a perfect one-hot prediction costs more than 0
    perfect = np.array([[1.0 - 1e-7, 1e-7]], "float32")
    assert float(loss(np.array([[1.0, 0.0]], "float32"), perfect)) > 0.1


def test_mixup_mixes_images_and_labels_by_the_same_share():
    from restransfer.training.losses import apply_mixup

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 4, 4, 3)).astype("float32")
    labels = np.eye(2, dtype="float32")[np.arange(8) % 2]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    mixed_images, mixed_labels = next(iter(apply_mixup(batches, alpha=0.4, seed=0)))
    mixed_images, mixed_labels = mixed_images.numpy(), mixed_labels.numpy()
    assert not np.allclose(mixed_labels, labels), "labels are no longer one-hot"
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)
    for image, label in zip(mixed_images, mixed_labels):
        # each mixed image is share * one image + (1 - share) * another, and its label mixes
        # their labels by the same share
        best = None
        for a in range(8):
            for b in range(8):
                direction = (images[a] - images[b]).ravel()
                share = 1.0 if a == b else float(np.clip(
                    np.dot(image.ravel() - images[b].ravel(), direction) / np.dot(direction, direction), 0, 1))
                residual = np.abs(image - (share * images[a] + (1 - share) * images[b])).max()
                if best is None or residual < best[0]:
                    best = (residual, share, a, b)
        residual, share, a, b = best
        assert residual < 1e-2
        np.testing.assert_allclose(label, share * labels[a] + (1 - share) * labels[b], atol=1e-3)
    again = next(iter(apply_mixup(batches, alpha=0.4, seed=0)))[1].numpy()
    np.testing.assert_array_equal(again, mixed_labels)  # drawn from (seed, phase, step): replayable


def cache_recipe(cache, augmentation="none", views=1):
    return rt.ClassificationRecipe(
        backbone="resnet18", weights=None, image_size=32, batch_size=8, augmentation=augmentation,
        early_stopping_patience=None, deterministic=True, cache_features=cache, cache_views=views,
        phases=[Phase("head", epochs=3, lr=0.01, schedule="one_cycle")])


def cached_vs_uncached(tiny_folder, cache, augmentation="none", views=1):
    recipe = cache_recipe(cache, augmentation, views)
    recipe.fit(tiny_folder, verbose=0)
    return recipe


def test_feature_cache_gives_the_uncached_loss_trajectory(tiny_folder):
    plain = cached_vs_uncached(tiny_folder, cache=False)
    cached = cached_vs_uncached(tiny_folder, cache="auto")
    for key in ("loss", "val_loss", "accuracy"):
        np.testing.assert_allclose(cached.history.history[key], plain.history.history[key], rtol=1e-5, atol=1e-6)
    head = lambda r: r.model.get_layer("head").get_weights()
    for a, b in zip(head(plain), head(cached)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_augmented_views_cache_matches_when_views_cover_the_epochs(tiny_folder):
    plain = cached_vs_uncached(tiny_folder, cache=False, augmentation="light")
    cached = cached_vs_uncached(tiny_folder, cache=True, augmentation="light", views=3)
    np.testing.assert_allclose(cached.history.history["loss"], plain.history.history["loss"], rtol=1e-5)
    # "auto" never caches augmented data (it would not be exact); the choice needs no training
    train = rt.data.image_folder(tiny_folder, split="train", progress=False)
    assert cache_recipe(cache="auto", augmentation="light")._feature_cache(train, None) is None
    assert cache_recipe(cache="auto")._feature_cache(train, None) is not None  # unaugmented: cached


def test_feature_cache_on_disk_is_keyed_by_weights(tiny_folder, tmp_path):
    from restransfer.training.caching import FeatureCache

    source = rt.data.image_folder(tiny_folder, split="train", progress=False)
    backbone = rt.build_backbone("resnet18", input_shape=(32, 32, 3))
    cache = FeatureCache(source, 32, 8, cache_dir=tmp_path, memory_budget_mb=0, progress=False)
    first = np.asarray(cache.features(backbone))
    assert first.shape == (1, len(source), 512) and len(list(tmp_path.glob("features-*.npy"))) == 1
    again = FeatureCache(source, 32, 8, cache_dir=tmp_path, progress=False).features(backbone)
    assert isinstance(again, np.memmap)  # read back from disk, not recomputed
    np.testing.assert_array_equal(first, again)
    conv = backbone.get_layer("conv1_conv")
    conv.set_weights([w * 0.5 for w in conv.get_weights()])
    FeatureCache(source, 32, 8, cache_dir=tmp_path, progress=False).features(backbone)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2, "changed weights, new cache"


def test_adamw_weight_decay_exclusions_survive_a_reload():
    # the exclusions must be in the optimizer's config, or a checkpoint reloads without them
    model = tiny_model()
    phase = Phase("all", epochs=1, lr=0.1, optimizer="adamw", weight_decay=0.5)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(make_optimizer(model, phase, 10)))
    head = model.get_layer("head").classifier
    head.set_weights([np.ones_like(w) for w in head.get_weights()])
    restored.apply_gradients([(np.zeros_like(v), v) for v in head.trainable_variables])
    kernel, bias = head.get_weights()
    assert np.all(kernel < 1.0)               # decayed
    np.testing.assert_array_equal(bias, 1.0)  # excluded by name, after the reload


def _ema_snapshot(model):
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # mixed precision wraps it
    averages = {id(v): np.array(a) for v, a in zip(optimizer._trainable_variables,
                                                   optimizer._model_variables_moving_average)}
    return {w.path: averages.get(id(w), np.array(w)) for w in model.weights}


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_ema_weights_are_validated_kept_and_saved(tmp_path, precision):
    """With ema and early stopping: each epoch is validated on the EMA weights, the best
    epoch's EMA weights are kept (Keras alone would restore raw ones), and they are saved --
    also under mixed_float16 (a GPU's default), where Keras wraps the optimizer in a
    LossScaleOptimizer whose own use_ema is False."""
    snapshots, raw, logged, applied = [], [], [], []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append(_ema_snapshot(self.model))
            raw.append({w.path: np.array(w) for w in self.model.trainable_weights})
            logged.append((logs["val_accuracy"], logs["val_loss"]))
            applied.append(int(self.model.optimizer.iterations))  # steps the loss scale did not skip

    # 8 steps an epoch: under mixed_float16 the loss scale's search skips the first few
    # (4 measured, from 32768 to 2048), and EMA weights equal the raw ones until 2 steps apply
    folder = bright_dark_folder(tmp_path / "data", train_per_class=48)

    recipe = rt.ClassificationRecipe(
        backbone="resnet18", weights=None, image_size=32, batch_size=12, augmentation="none",
        early_stopping_patience=2, deterministic=True, precision=precision,
        phases=[Phase("all", epochs=3, lr=3e-3, ema=True, schedule="constant")])
    recipe.fit(folder, callbacks=[Record()], verbose=0)
    assert (type(recipe.model.optimizer).__name__ == "LossScaleOptimizer") == (precision == "mixed_float16")
    accuracies = [a for a, _ in logged]
    best = int(np.argmax(accuracies))  # the first best epoch, as early stopping keeps it
    assert applied[best] >= 2, f"the test cannot tell EMA from raw weights: {applied[best]} step(s) applied by epoch {best + 1}"
    kept = {w.path: np.array(w) for w in recipe.model.weights}
    for path, value in snapshots[best].items():
        np.testing.assert_array_equal(kept[path], value, err_msg=path)
    assert any(not np.array_equal(kept[path], value) for path, value in raw[best].items()), \
        "the raw weights would have passed too"
    assert recipe.evaluate(folder / "val")["loss"] == pytest.approx(logged[best][1], rel=1e-3)
    reloaded = rt.ClassificationRecipe.load(recipe.save(tmp_path / "m.keras"))
    for a, b in zip(reloaded.model.get_weights(), recipe.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_the_multi_worker_loop_validates_the_ema_weights():
    """restransfer's own loop (used under MultiWorkerMirroredStrategy, run here with the default
    strategy) drives on_test_begin/end as fit does, so SwapEMAWeights validates the EMA weights."""
    from restransfer.training import distribute
    from restransfer.training.losses import loss_and_metrics

    model = tiny_model()
    phase = Phase("all", epochs=2, lr=3e-3, ema=True, schedule="constant")
    model.compile(optimizer=make_optimizer(model, phase, 2), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32"), np.eye(2, dtype="float32")[np.arange(16) % 2]
    validated, recorded_raw = [], []

    class WeightsDuringValidation(keras.callbacks.Callback):  # listed before SwapEMAWeights:
        def on_test_begin(self, logs=None):  # runs before its swap, and
            self.averages = _ema_snapshot(self.model)
            self.raw = {w.path: np.array(w) for w in self.model.weights}

        def on_test_end(self, logs=None):  # before its swap back
            validated.append(({w.path: np.array(w) for w in self.model.weights}, self.averages))
            recorded_raw.append(self.raw)

    loss, metrics = loss_and_metrics(False)
    distribute.fit_multi_worker(
        tf.distribute.get_strategy(), model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(),
        loss=loss, metrics=metrics, validation_data=tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
        val_metrics=loss_and_metrics(False)[1], epochs=2, initial_epoch=0, steps_per_epoch=2,
        callbacks=[WeightsDuringValidation(), keras.callbacks.SwapEMAWeights()], verbose=0)
    assert len(validated) == 2
    for weights, averages in validated:
        # SwapEMAWeights swaps by arithmetic (a+b, a-b): equal to float rounding
        for path, value in averages.items():
            np.testing.assert_allclose(weights[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
    # and the raw weights differ from them (so validating the raw weights would fail)
    raw, averages = recorded_raw[-1], validated[-1][1]
    assert any(not np.allclose(raw[path], value, rtol=1e-3, atol=1e-5) for path, value in averages.items())


def test_a_kill_between_a_checkpoints_files_leaves_a_model_with_its_own_state(tmp_path, monkeypatch):
    """The model and the training state are one unit: killed right after the model's file
    was renamed into place, the checkpoint still pairs each model with its own epoch."""
    import os

    from restransfer.training.checkpoints import Checkpointer

    model = tiny_model()
    compile_model(model, keras.optimizers.Adam(), multi_label=False)
    saved = {}
    checkpointer = Checkpointer(tmp_path)
    for epoch in (1, 2):
        model.get_layer("head").classifier.kernel.assign(np.full((512, 2), float(epoch), "float32"))
        saved[epoch] = np.copy(model.get_layer("head").classifier.kernel.numpy())
        if epoch == 2:
            real_replace = os.replace

            def killed_after_the_model(source, target):
                real_replace(source, target)
                if str(target).endswith("last.keras"):
                    raise KeyboardInterrupt("kill -9")

            monkeypatch.setattr(os, "replace", killed_after_the_model)
            with pytest.raises(KeyboardInterrupt):
                checkpointer.save(model, {"epoch": epoch})
            monkeypatch.undo()
        else:
            checkpointer.save(model, {"epoch": epoch})
    loaded, state = Checkpointer(tmp_path).load()
    kernel = loaded.get_layer("head").classifier.kernel.numpy()
    np.testing.assert_array_equal(kernel, saved[state["epoch"]])


def _anonymous_memory_mb():
    """Memory of this process that is not a mapped file (a copy of a cache would be here)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("RssAnon")) / 1024


def test_a_memory_mapped_feature_cache_is_read_batch_by_batch(tmp_path):
    """A cache on disk (the size that goes to disk: above the memory budget) is not copied
    whole into memory when the head trains on it."""
    from restransfer import data as data_lib
    from restransfer.training.caching import FeatureCache

    count = 200_000  # x 512 float32 features: a 410 MB cache
    source = data_lib.from_arrays(np.zeros((count, 2, 2, 3), np.uint8), np.arange(count) % 2)
    backbone = rt.build_backbone("resnet18", input_shape=(32, 32, 3))
    cache = FeatureCache(source, 32, 64, cache_dir=tmp_path, memory_budget_mb=0, progress=False)
    path = tmp_path / "features.npy"
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1, count, 512))
    features[0, :, 0] = np.arange(count)  # feature 0 names the image
    features.flush()
    del features
    cache._features, cache._key = np.load(path, mmap_mode="r"), cache.key(backbone)
    before = _anonymous_memory_mb()
    batches = list(cache.train_dataset(backbone, start_epoch=0).take(3))
    grown = _anonymous_memory_mb() - before
    assert grown < 100, f"memory grew by {grown:.0f} MB for 3 batches of a 410 MB cache"
    order = np.asarray(data_lib.epoch_order(count, 0, 0))[:64]
    features, labels = batches[0]
    np.testing.assert_array_equal(features.numpy()[:, 0], order)  # the epoch's order, as in memory
    np.testing.assert_array_equal(labels.numpy(), order % 2)


def test_a_ctrl_c_lost_where_errors_are_swallowed_still_stops_training(tiny_folder):
    """SIGINT raises KeyboardInterrupt wherever Python is; raised inside code that swallows it
    (a finalizer, say), it would be lost and the run would go on. The CLI latches it and the
    phase loop raises it again at the next batch end."""
    import os
    import signal

    from restransfer.training import interrupts

    class CtrlCSwallowed(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            type(self).batches += 1
            if type(self).batches == 1:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(100):  # the handler runs between bytecodes
                        pass
                except KeyboardInterrupt:
                    pass  # lost, as in a finalizer

    previous = signal.getsignal(signal.SIGINT)
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=4,
                                     augmentation="none", phases=[Phase("all", epochs=2)],
                                     early_stopping_patience=None)
    with interrupts.latch_ctrl_c(), pytest.raises(KeyboardInterrupt):
        recipe.fit(tiny_folder / "train", validation_data=None, callbacks=[CtrlCSwallowed()], verbose=0)
    assert CtrlCSwallowed.batches <= 2, "training went on after the Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_ctrl_c_that_c_code_turned_into_another_error_is_still_an_interrupt():
    """A Ctrl-C raised inside C code can come out as a different error (CI saw TensorFlow's
    "SystemError: ... returned a result with an exception set"), and the CLI then crashed
    with exit 1 instead of saying how to resume. Within the latch it is a KeyboardInterrupt,
    chained to what it became; an error with no Ctrl-C before it passes unchanged."""
    import os
    import signal

    from restransfer.training import interrupts

    def c_code_that_swallows_the_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        except KeyboardInterrupt as error:
            raise SystemError("<built-in method __array__> returned a result with an exception set") from error

    with pytest.raises(KeyboardInterrupt) as caught, interrupts.latch_ctrl_c():
        c_code_that_swallows_the_interrupt()
    assert isinstance(caught.value.__cause__, SystemError)
    with pytest.raises(ValueError), interrupts.latch_ctrl_c():  # the latch was cleared on exit
        raise ValueError("a real error")
