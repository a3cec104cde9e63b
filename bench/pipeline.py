"""Input-pipeline throughput vs a ResNet-50 training step (issue 3).

    .venv/bin/python bench/pipeline.py [--data ../shared/data/hymenoptera/train] [--size 224]

Measures decode + resize + albumentations ("light") images/s through restransfer's tf.data
pipeline over the folder (two passes, the second timed), and the images/s of a full
ResNet-50 training step at the same size and batch, so one can see which is the bottleneck.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def images_per_second(dataset, count):
    started = time.perf_counter()
    seen = 0
    for images, _ in dataset:
        seen += int(images.shape[0])
    return seen / (time.perf_counter() - started), seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/hymenoptera/train")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()

    import keras

    from restransfer import data

    folder = data.image_folder(args.data, progress=False)
    rows = []
    for augmentation in ("none", "light", "medium"):
        pipeline = data.make_pipeline(folder, args.size, args.batch, training=True,
                                      augmentation=augmentation, seed=0)
        images_per_second(pipeline, len(folder))  # warm: file cache, tracing
        rate, seen = images_per_second(pipeline, len(folder))
        rows.append((f"decode+resize+augment ({augmentation})", rate))

    model = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3), classes=2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32")
    y = np.zeros(args.batch, "int32")
    model.train_on_batch(x, y)  # trace
    started = time.perf_counter()
    for _ in range(args.train_steps):
        model.train_on_batch(x, y)
    rows.append(("ResNet-50 full training step", args.batch * args.train_steps / (time.perf_counter() - started)))

    print(f"{len(folder)} images from {args.data}, {args.size} px, batch {args.batch}, "
          f"{os.cpu_count()} cores\n")
    print("| stage | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")
    print(f"\npipeline / training ratio (light): {rows[1][1] / rows[-1][1]:.0f}x")


if __name__ == "__main__":
    main()
