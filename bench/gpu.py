"""restransfer itself on a GPU, end to end (issue 19): its pipeline from JPEG files, its phases,
its feature cache and its exported SavedModel, each beside the pipeline's own rate.

    bash bench/gpu.sh                 # on the GPU machine (needs TensorFlow with CUDA there)
    .venv/bin/python bench/gpu.py --quick   # a minute on a CPU: checks the script runs

Data: ``--images`` generated JPEGs of 500x375 (bench/pipeline.py's generator; two classes),
written once under ``--cache``. Backbone ResNet-50 from random weights (throughput does not
depend on the values, and the GPU machine cannot download any), 224 px, ``light``
augmentation, ``precision="auto"`` (mixed float16 on a GPU, XLA where Keras turns it on).

Rows (images/s; epochs after the first, which traces and compiles):
  * pipeline alone: make_pipeline's training batches, first epoch (decoding) and later epochs
    (images decoded once, kept in memory);
  * full fine-tuning (every layer trains);
  * head only, images through the frozen backbone every epoch;
  * head only on the feature cache (the backbone runs once, then the head trains on features);
  * inference through the exported SavedModel's ``serving_default`` on the original JPEG bytes,
    beside the decode + resize rate of the same files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))


def epoch_timer():
    import keras

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._started)

    return EpochTimes()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="per measurement; the first is not timed")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the JPEGs are made (default: a folder in the temp dir named by --images)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = parser.parse_args()
    if args.quick:
        args.images, args.backbone, args.size, args.batch, args.epochs = 128, "resnet18", 64, 32, 2

    args.cache = args.cache or Path(tempfile.gettempdir()) / f"restransfer-gpu-jpegs-{args.images}"
    import tensorflow as tf

    import restransfer as rt
    from pipeline import generate
    from restransfer import data
    from restransfer.devices import configure_precision, gpu_count
    from restransfer.training.phases import Phase

    paths = generate(args.cache, args.images)
    train = data.image_folder(args.cache, progress=False)
    if len(train) != args.images:
        sys.exit(f"{args.cache} holds {len(train)} images, not {args.images}: use another --cache")
    count, paths = len(train), train.paths
    device = tf.config.list_physical_devices("GPU")
    print(f"{count} JPEGs (500x375), {args.backbone}, {args.size} px, batch {args.batch}, "
          f"{'GPU: ' + str(device[0].name) if device else 'no GPU (CPU)'}, {os.cpu_count()} CPU cores, "
          f"precision auto -> {configure_precision('auto')}", flush=True)
    rows = []

    # the pipeline alone
    pipeline = data.make_pipeline(train, args.size, args.batch, training=True, augmentation="light",
                                  seed=0, epochs=args.epochs)
    steps = count // args.batch
    batches = iter(pipeline)
    started = time.perf_counter()
    for _ in range(steps):
        next(batches)
    first = steps * args.batch / (time.perf_counter() - started)
    started, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += int(images.shape[0])
    later = seen / (time.perf_counter() - started)
    rows.append(("pipeline alone, first epoch (decoding JPEGs)", first, None))
    rows.append(("pipeline alone, later epochs (decoded once)", later, None))
    print(rows[-2:], flush=True)

    def fit(name, phase, beside_pipeline=True, **options):
        import keras

        keras.backend.clear_session()
        recipe = rt.ClassificationRecipe(
            backbone=args.backbone, weights=None, class_names=train.class_names, image_size=args.size,
            batch_size=args.batch, phases=[phase], augmentation="light", early_stopping_patience=None,
            val_fraction=0, precision="auto", seed=0, **options)
        timer = epoch_timer()
        started = time.perf_counter()
        recipe.fit(train, callbacks=[timer], verbose=0)
        total = time.perf_counter() - started
        per_epoch = sorted(timer.seconds[1:])[len(timer.seconds[1:]) // 2] if len(timer.seconds) > 1 else total
        rows.append((name, steps * args.batch / per_epoch, later if beside_pipeline else None))
        print(rows[-1], f"(whole fit {total:.0f} s)", flush=True)
        return recipe

    fit("full fine-tuning (all layers)", Phase("all", epochs=args.epochs, lr=1e-3), cache_features=False)
    fit("head only, through the frozen backbone", Phase("head", epochs=args.epochs, lr=1e-3), cache_features=False)
    started = time.perf_counter()
    recipe = fit("head only, on the feature cache (epochs after the cache)", Phase("head", epochs=args.epochs, lr=1e-3),
                 beside_pipeline=False, cache_features=True)  # cached epochs read features, not images
    rows.append(("head only, feature cache: whole fit incl. the backbone pass",
                 count * args.epochs / (time.perf_counter() - started), None))

    # inference through the exported SavedModel, on the original bytes
    with tempfile.TemporaryDirectory() as folder:
        export = recipe.export(Path(folder) / "model", warmup_images=paths[:4])
        loaded = tf.saved_model.load(str(export))
        serve = loaded.signatures["serving_default"]
        encoded = [Path(p).read_bytes() for p in paths]
        chunks = [tf.constant(encoded[i: i + args.batch]) for i in range(0, count - args.batch + 1, args.batch)]
        serve(image_bytes=chunks[0])  # warm up
        started = time.perf_counter()
        for chunk in chunks:
            serve(image_bytes=chunk)["probabilities"].numpy()
        served = len(chunks) * args.batch / (time.perf_counter() - started)
        evaluation = data.make_pipeline(train, args.size, args.batch, cache_pixels=False)
        started, seen = time.perf_counter(), 0
        for images, _ in evaluation:
            seen += int(images.shape[0])
        decode_rate = seen / (time.perf_counter() - started)
        rows.append(("inference, exported SavedModel on JPEG bytes", served, decode_rate))

    print("\n| measurement | images/s | pipeline alone | the slower side |\n|---|---|---|---|")
    for name, rate, beside in rows:
        side = "–" if beside is None else ("input pipeline" if beside < rate * 1.1 else "model")
        print(f"| {name} | {rate:.0f} | {'–' if beside is None else f'{beside:.0f}'} | {side} |")
    print(f"\n(gpus: {gpu_count()})")


if __name__ == "__main__":
    main()
