"""The tf.data input pipeline: seeded epoch order, resize, augmentation, batching."""

from __future__ import annotations

import logging
import time

import numpy as np

from restransfer.data.decoding import resize_image, resize_mask
from restransfer.graph import plain

log = logging.getLogger("restransfer.data")

# The most memory decoded, resized images may take per data set and image size (bytes).
PIXEL_CACHE_BYTES = 4 * 2**30


def resized_pixels(data, image_size: int, quantised: bool = False, limit: int = PIXEL_CACHE_BYTES):
    """Every file of ``data`` decoded and resized once: [N, size, size, C] float32, the very
    pixels the pipeline computes for an image in every epoch (decoding and resizing have no
    randomness), so using them changes nothing but the time. ``quantised``: rounded to uint8
    (a quarter of the memory), for pipelines that round before augmenting anyway. Made on
    first use and kept on ``data``; None for in-memory arrays and streams, or when they would
    take more than ``limit`` bytes (then every epoch decodes again).

    Why: decoding a 500x375 JPEG (~2 ms) and the antialiased resize (~3 ms) are most of an
    image's cost on a CPU; after the first epoch only augmentation is left (bench/pipeline.py).
    """
    if data.paths is None or limit <= 0:
        return None
    dtype = np.uint8 if quantised else np.float32
    key = (image_size, np.dtype(dtype).name)
    size = len(data) * image_size * image_size * data.channels * np.dtype(dtype).itemsize
    if size > limit:
        if ("too big", *key) not in data._pixels:  # said once per data set
            data._pixels["too big", *key] = True
            log.info("%d images at %d px would take %.1f GB decoded (limit %.1f GB): decoding them every epoch",
                     len(data), image_size, size / 2**30, limit / 2**30)
        return None
    if key not in data._pixels:
        import tensorflow as tf

        spatial = data.has_masks

        def prepare(image, target):
            image = resize_image(image, image_size)
            return (quantise(image) if quantised else image), (resize_mask(target, image_size) if spatial else target)

        started = time.perf_counter()
        pixels = np.empty((len(data), image_size, image_size, data.channels), dtype)
        masks = np.empty((len(data), image_size, image_size), np.uint8) if spatial else None
        start = 0
        for images, targets in data.dataset.map(plain(prepare), num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True).batch(64):
            pixels[start: start + len(images)] = images.numpy()
            if spatial:  # masks come along, resized by nearest neighbour once too
                masks[start: start + len(images)] = targets.numpy()
            start += len(images)
        data._pixels[key] = pixels
        if spatial:
            data._pixels["masks", image_size] = masks
        log.info("decoded %d images once at %d px (%.1f GB, %.0f s)", len(data), image_size,
                 pixels.nbytes / 2**30, time.perf_counter() - started)
    return data._pixels[key]


def quantise(images):
    """Resized float pixels -> uint8, as augmentation takes them."""
    import tensorflow as tf

    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)


def epoch_order(count: int, seed: int, epoch):
    """The order epoch ``epoch`` visits ``count`` images in, drawn from (seed, epoch)."""
    import tensorflow as tf

    return tf.random.experimental.stateless_shuffle(
        tf.range(count, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def make_pipeline(
    data,
    image_size: int,
    batch_size: int,
    training: bool = False,
    augmentation=None,
    seed: int = 0,
    start_epoch: int = 0,
    in_order: bool = False,
    epochs: int | None = None,
    shard: tuple[int, int] | None = None,
    cache_pixels: bool | None = None,
):
    """Batches of (float32 images 0-255 at image_size, labels), prefetched.

    ``cache_pixels`` (default: for training pipelines) reads images from
    :func:`resized_pixels` when they fit in memory: the same pixels, decoded once.

    ``shard=(workers, index)`` (training pipelines, multi-worker): this worker's share of
    every epoch -- every ``workers``-th image of the epoch's order from ``index``, the same
    number on every worker (the ``len % workers`` images left over change each epoch). Only
    the shard's files are read.

    ``in_order`` keeps index order in training pipelines (still augmented with the epoch's
    seeds): used to cache augmented views of features. ``epochs`` bounds the pipeline.

    Evaluation pipelines are finite and in order. Training pipelines are endless (fit with
    ``steps_per_epoch``): epoch ``e`` visits the images in an order drawn from ``(seed, e)``
    and augments image ``i`` with a seed drawn from ``(seed, e, i)``, so any epoch can be
    reproduced exactly -- which is what makes an interrupted run resumable from
    ``start_epoch`` with the same data it would have seen.
    """
    import tensorflow as tf

    from restransfer.data.augmentation import Augmenter

    spatial = data.has_masks  # segmentation: the target is a mask, resized and augmented with its image

    def resize(image, target, *rest):
        return (resize_image(image, image_size), resize_mask(target, image_size) if spatial else target, *rest)

    augmenter = Augmenter(augmentation, image_size) if training else None
    active = training and augmenter.active
    if cache_pixels is None:
        cache_pixels = training
    precise = bool(data.keep_precision)  # 16-bit files (or float arrays): augmented as float32, never rounded
    pixels = resized_pixels(data, image_size, quantised=active and not precise) \
        if cache_pixels and shard is None else None
    if pixels is not None:
        labels = tf.constant(data.labels)
        masks = data._pixels.get(("masks", image_size)) if spatial else None
        shape = [None, image_size, image_size, data.channels]

        def fetch_batch(indices, *rest):  # one copy out of memory per batch
            images = tf.numpy_function(lambda k: pixels[k], [indices], tf.as_dtype(pixels.dtype), stateful=False)
            if spatial:
                targets = tf.ensure_shape(tf.numpy_function(lambda k: masks[k], [indices], tf.uint8, stateful=False),
                                          [None, image_size, image_size])
            else:
                targets = tf.gather(labels, indices)
            return (tf.ensure_shape(images, shape), targets, *rest)

    if not training:
        if pixels is not None:
            return tf.data.Dataset.range(len(data)).batch(batch_size).map(plain(fetch_batch)).prefetch(tf.data.AUTOTUNE)
        return data.dataset.map(plain(resize), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True) \
            .batch(batch_size).prefetch(tf.data.AUTOTUNE)
    channels = data.channels

    def augment_batch(images, targets, image_seeds):
        # One Python call per batch, not per image: fewer GIL hand-offs (~2x faster here).
        if precise:
            images = tf.cast(images, tf.float32)
        elif images.dtype != tf.uint8:  # cached pixels: already
            images = quantise(images)
        if spatial:  # the same draw moves the image and its mask (nearest neighbour for the mask)
            out, targets = tf.numpy_function(augmenter.batch, [images, image_seeds, targets],
                                             [images.dtype, tf.uint8], stateful=False)
            targets = tf.ensure_shape(targets, [None, image_size, image_size])
        else:
            out = tf.numpy_function(augmenter.batch, [images, image_seeds], images.dtype, stateful=False)
        out = tf.ensure_shape(out, [None, image_size, image_size, channels])
        return tf.cast(out, tf.float32), targets

    count = len(data)
    if data.random_access:
        if pixels is None:
            fetch = data.fetcher()

        def one_epoch(epoch):
            order = tf.range(count, dtype=tf.int64) if in_order else epoch_order(count, seed, epoch)
            if shard is not None:
                workers, index = shard
                order = order[index: count // workers * workers: workers]
            image_seeds = seed * 1_000_003 + epoch * 100_003 + order
            if pixels is not None:
                return tf.data.Dataset.from_tensor_slices((order, image_seeds)).batch(batch_size).map(
                    plain(fetch_batch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return tf.data.Dataset.from_tensor_slices((order, image_seeds)).map(
                plain(lambda i, s: resize(*fetch(i), s)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).batch(batch_size)

        last = start_epoch + epochs if epochs is not None else 2**31
        ds = tf.data.Dataset.range(start_epoch, last).flat_map(plain(one_epoch))
    else:  # streamed sources (TFDS): seeded shuffle, not reproducible across a resume
        ds = data.dataset if shard is None else data.dataset.shard(*shard)
        ds = ds.shuffle(min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))
        ds = ds.map(plain(lambda item, s: resize(item[0], item[1], s)), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size).repeat()
    if active:
        ds = ds.map(plain(augment_batch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(plain(lambda images, labels, _: (images, labels)))
    return ds.prefetch(tf.data.AUTOTUNE)
