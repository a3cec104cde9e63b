"""Training throughput: plain Keras vs restransfer, side by side (issue 8).

    .venv/bin/python bench/throughput.py [--images 64] [--skip-rss]

ResNet-50 at 224 px on the first N images of ../shared/data/hymenoptera/train (random-init
weights: speed does not depend on the values), batch 32. Each case runs in its own process
(so peak RSS is its own); img/s is measured over the epochs after the first (tracing,
caching). Cases:
  (a) full fine-tune: plain Keras (image_dataset_from_directory + keras.applications
      ResNet50 + fit, no augmentation) vs restransfer (its tf.data pipeline with `light`
      albumentations augmentation on), plus restransfer under mixed_bfloat16
  (b) frozen backbone, head only, uncached: plain Keras (base.trainable=False) vs restransfer
  (c) frozen backbone, head only, restransfer's feature cache
  (d) streaming: peak RSS of one epoch over 2,000 vs 20,000 generated 32 px images (ResNet-18)
Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hymenoptera" / "train"


def subset_folder(count: int) -> Path:
    """The first `count` images (sorted, both classes alternating) as a folder of links."""
    root = Path(tempfile.mkdtemp(prefix="throughput-"))
    classes = sorted(d.name for d in DATA.iterdir() if d.is_dir())
    files = {c: sorted(p for p in (DATA / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg")) for c in classes}
    for index in range(count):
        cls = classes[index % len(classes)]
        source = files[cls][index // len(classes)]
        (root / cls).mkdir(exist_ok=True)
        (root / cls / source.name).symlink_to(source)
    return root


class EpochTimer:
    def __init__(self):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                outer.seconds.append(time.perf_counter() - outer.started)

        self.seconds: list[float] = []
        self.callback = Callback()


def plain_keras(folder: Path, frozen: bool, epochs: int) -> list[float]:
    import keras

    ds = keras.utils.image_dataset_from_directory(folder, image_size=(224, 224), batch_size=32,
                                                  shuffle=True, seed=0, verbose=False)
    base = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg",
                                       input_shape=(224, 224, 3))
    base.trainable = not frozen
    inputs = keras.Input((224, 224, 3))
    x = keras.applications.resnet.preprocess_input(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(base(x, training=not frozen))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(ds.prefetch(2), epochs=epochs, callbacks=[timer.callback], verbose=0)
    return timer.seconds


def restransfer_run(folder: Path, frozen: bool, epochs: int, cache: bool, augmentation: str,
                    precision: str = "float32", backbone: str = "resnet50", size: int = 224) -> list[float]:
    import restransfer as rt
    from restransfer.training.phases import Phase

    recipe = rt.ClassificationRecipe(
        backbone=backbone, weights=None, image_size=size, batch_size=32, augmentation=augmentation,
        phases=[Phase("head" if frozen else "all", epochs=epochs, lr=1e-3, schedule="constant")],
        early_stopping_patience=None, val_fraction=0, cache_features="auto" if cache else False,
        precision=precision)
    timer = EpochTimer()
    recipe.fit(folder, callbacks=[timer.callback], verbose=0)
    return timer.seconds


def make_small_images(count: int) -> Path:
    import numpy as np
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix=f"stream{count}-"))
    rng = np.random.default_rng(0)
    for index in range(count):
        cls = root / f"c{index % 2}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(cls / f"{index}.png")
    return root


def run_case(case: str, images: int) -> dict:
    if case.startswith("stream"):
        count = int(case[len("stream"):])
        folder = make_small_images(count)
        seconds = restransfer_run(folder, frozen=False, epochs=1, cache=False, augmentation="none",
                                  backbone="resnet18", size=32)
        shutil.rmtree(folder)
        return {"case": case, "images": count, "seconds": seconds}
    folder = subset_folder(images)
    epochs = 3
    if case == "plain_full":
        seconds = plain_keras(folder, frozen=False, epochs=epochs)
    elif case == "plain_frozen":
        seconds = plain_keras(folder, frozen=True, epochs=epochs)
    elif case == "rt_full":
        seconds = restransfer_run(folder, False, epochs, cache=False, augmentation="light")
    elif case == "rt_full_bf16":
        seconds = restransfer_run(folder, False, epochs, cache=False, augmentation="light",
                                  precision="mixed_bfloat16")
    elif case == "rt_frozen":
        seconds = restransfer_run(folder, True, epochs, cache=False, augmentation="none")
    elif case == "rt_frozen_cached":
        seconds = restransfer_run(folder, True, epochs, cache=True, augmentation="none")
    else:
        raise SystemExit(f"unknown case {case}")
    shutil.rmtree(folder)
    return {"case": case, "images": images, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    if args.case:
        result = run_case(args.case, args.images)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    cases = ["plain_full", "rt_full", "rt_full_bf16", "plain_frozen", "rt_frozen", "rt_frozen_cached"]
    if not args.skip_rss:
        cases += ["stream2000", "stream20000"]
    results = {}
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--images", str(args.images)],
                             capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{case} failed:\n{out.stderr[-3000:]}")
        results[case] = json.loads(line[-1][len("RESULT "):])
        print(f"{case}: {results[case]}", file=sys.stderr, flush=True)

    def rate(case):
        r = results[case]
        later = r["seconds"][1:] or r["seconds"]
        return r["images"] / (sum(later) / len(later))

    rows = [("(a) full fine-tune", "plain_full", "rt_full"),
            ("(a') full fine-tune, restransfer mixed_bfloat16", "plain_full", "rt_full_bf16"),
            ("(b) frozen backbone, uncached", "plain_frozen", "rt_frozen"),
            ("(c) frozen backbone, restransfer cached", "plain_frozen", "rt_frozen_cached")]
    print(f"ResNet-50, 224 px, batch 32, first {args.images} images of hymenoptera/train, "
          f"{os.cpu_count()} cores; img/s over epochs 2-3\n")
    print("| case | plain Keras img/s | restransfer img/s | ratio | peak RSS plain / restransfer (MB) |")
    print("|---|---|---|---|---|")
    for name, plain, ours in rows:
        print(f"| {name} | {rate(plain):.1f} | {rate(ours):.1f} | {rate(ours) / rate(plain):.2f} | "
              f"{results[plain]['peak_rss_mb']:.0f} / {results[ours]['peak_rss_mb']:.0f} |")
    if not args.skip_rss:
        print("\n| streaming (ResNet-18, 32 px, 1 epoch) | images | seconds | peak RSS (MB) |")
        print("|---|---|---|---|")
        for case in ("stream2000", "stream20000"):
            r = results[case]
            print(f"| {case} | {r['images']} | {r['seconds'][0]:.0f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
