"""Input-pipeline throughput per core, stage by stage (issue 19).

    .venv/bin/python bench/pipeline.py                 # hymenoptera + 20,000 generated JPEGs
    .venv/bin/python bench/pipeline.py --generated 0   # hymenoptera only

For each stage -- read, decode (libjpeg alone: the lower bound), the image contract's decode
(EXIF orientation, conversions), + resize to 224 px, + augmentation, + batching -- images/s
with 1 and with 2 parallel calls. Each measurement pins tf.data to that many threads and one
thread per op (``private_threadpool_size``, ``max_intra_op_parallelism``), so "per core" is
what one core does and the 1 -> 2 column shows how it scales. Every stage includes the ones
before it (a pipeline is as fast as its slowest part, and they share the cores).

Augmentation rows: ``light`` in TensorFlow ops (restransfer's path for the presets), and the
same ``light`` through albumentations (one Python call per batch; the path for transforms
with no graph version), for comparison. The last rows time ``make_pipeline`` itself as fit
uses it (AUTOTUNE, all cores).

The generated set: 20,000 JPEGs of 500x375 (about ImageNet's typical size; hymenoptera's is
the same), smooth random scenes with noise so they compress like photos (~40 KB at quality
90), written once to ``--cache`` (outside the repository); a stage reads ``--per-stage``
of them, in a different order for every stage, so the page cache holds them but no decoder
cache does.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

SIZE = 224


def generate(folder: Path, count: int, width: int = 500, height: int = 375) -> list[str]:
    """``count`` photo-like JPEGs in ``folder`` (two class folders), made once."""
    from PIL import Image

    paths = [folder / ("a" if i % 2 else "b") / f"{i:05d}.jpg" for i in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"generating {len(missing)} JPEGs in {folder} ...", flush=True)
        rng = np.random.default_rng(0)
        for path in missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
            scene = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
            scene += rng.normal(0, 12, scene.shape)
            Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return [str(p) for p in paths]


def rate(dataset, count: int) -> float:
    """Images/s of one pass over ``dataset`` (after a warm-up pass over its first batches)."""
    for _ in dataset.take(2):
        pass
    started = time.perf_counter()
    seen = 0
    for images in dataset:
        seen += int(images.shape[0]) if images.shape.rank == 4 else 1
    return seen / (time.perf_counter() - started)


def stage_rows(paths: list[str], threads: int, batch: int):
    import tensorflow as tf

    from restransfer.data.augmentation import Augmenter
    from restransfer.data.decoding import decode_image_bytes, resize_image

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    light = Augmenter("light", SIZE)
    seeds = np.arange(len(paths), dtype=np.int64)
    touch = lambda out: tf.reduce_max(tf.cast(tf.reshape(out, [-1])[::9973], tf.float32))  # forces the work

    def over(fn, batched=False, albumentations=False):
        order = np.random.default_rng(threads).permutation(len(paths))
        ds = tf.data.Dataset.from_tensor_slices(([paths[i] for i in order], seeds[order]))
        if not batched:
            return ds.map(lambda p, s: touch(fn(p, s)), num_parallel_calls=threads).with_options(options)
        ds = ds.map(fn, num_parallel_calls=threads).batch(batch)
        if albumentations:
            def augment(images, image_seeds):
                pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
                return tf.numpy_function(light.batch, [pixels, image_seeds], tf.uint8, stateful=False)
            ds = ds.map(augment, num_parallel_calls=threads)
        else:
            ds = ds.map(lambda images, _: images)
        return ds.with_options(options)

    contract = lambda p, s: decode_image_bytes(tf.io.read_file(p))
    resized = lambda p, s: resize_image(contract(p, s), SIZE)
    augmented = lambda p, s: light.graph(resized(p, s), s)
    stages = [
        ("read", over(lambda p, s: tf.strings.length(tf.io.read_file(p)))),
        ("decode only (libjpeg, lower bound)", over(lambda p, s: tf.io.decode_jpeg(tf.io.read_file(p), channels=3))),
        ("image-contract decode", over(contract)),
        ("+ resize to 224 (bilinear, antialiased)", over(resized)),
        ("+ light augmentation, TensorFlow ops", over(augmented)),
        ("+ batch 32 (the whole pipeline, TF ops)", over(lambda p, s: (augmented(p, s), s), batched=True)),
        ("+ light through albumentations, batch 32", over(lambda p, s: (resized(p, s), s), batched=True,
                                                          albumentations=True)),
    ]
    for name, dataset in stages:
        yield name, rate(dataset, len(paths))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/hymenoptera/train"))
    parser.add_argument("--generated", type=int, default=20_000)
    parser.add_argument("--per-stage", type=int, default=2_000, help="generated images read per stage")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "restransfer-bench-jpegs")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    from restransfer import data

    folder = data.image_folder(args.data, progress=False)
    sets = [(f"{Path(args.data).parent.name}/{Path(args.data).name} ({len(folder)} JPEGs, ~500x375)", folder.paths * 3)]
    if args.generated:
        generated = generate(args.cache, args.generated)
        pick = np.random.default_rng(1).choice(len(generated), args.per_stage, replace=False)
        sets.append((f"generated ({args.generated} JPEGs of 500x375, {args.per_stage} read per stage)",
                     [generated[i] for i in pick]))
    print(f"{os.cpu_count()} cores; {SIZE} px; images/s (per core = with 1 thread; 2 threads: total and per core)\n")
    for title, paths in sets:
        one = dict(stage_rows(paths, 1, args.batch))
        two = dict(stage_rows(paths, 2, args.batch))
        print(f"**{title}**\n\n| stage | 1 core | 2 cores | per core at 2 | scaling |\n|---|---|---|---|---|")
        for name in one:
            print(f"| {name} | {one[name]:.0f} | {two[name]:.0f} | {two[name] / 2:.0f} | {two[name] / one[name] / 2:.0%} |")
        print()

    # make_pipeline as fit uses it: AUTOTUNE, every core, three epochs after a warm-up
    print("**`make_pipeline` as `fit` uses it (AUTOTUNE, all cores), hymenoptera**\n\n| augmentation | images/s |\n|---|---|")
    for augmentation in ("none", "light", "medical", "medium"):
        pipeline = data.make_pipeline(folder, SIZE, args.batch, training=True, augmentation=augmentation,
                                      seed=0, epochs=4)
        batches = iter(pipeline)
        for _ in range(len(folder) // args.batch):  # the first epoch: warm-up
            next(batches)
        started, seen = time.perf_counter(), 0
        for images, _ in batches:
            seen += int(images.shape[0])
        print(f"| {augmentation}{' (albumentations)' if augmentation == 'medium' else ''} | "
              f"{seen / (time.perf_counter() - started):.0f} |")


if __name__ == "__main__":
    main()
