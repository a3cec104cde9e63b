"""Data: how files become labelled pixels, and how pixels become batches.

- :mod:`~restransfer.data.decoding`: the image contract (bytes -> pixels in TensorFlow ops, the
  same in training and in the exported graph; the one resize);
- :mod:`~restransfer.data.sources`: folders, CSV, arrays, ``.npz``, TFDS -> :class:`ImageData`;
- :mod:`~restransfer.data.masks`: image/mask pairs for segmentation (the same sources), checked;
- :mod:`~restransfer.data.splits`: the one place that decides train/validation/test, k-fold;
- :mod:`~restransfer.data.pipeline`: the seeded tf.data pipeline;
- :mod:`~restransfer.data.augmentation`: albumentations presets inside tf.data;
- :mod:`~restransfer.data.medical`: DICOM/NIfTI readers, CT windows, intensity normalisation.

Imports only NumPy at module level (TensorFlow when a pipeline is built); nothing here
imports from models, training or tasks.
"""

from restransfer.data.decoding import (IMAGE_EXTENSIONS, SERVED_FORMATS, check_image, decode_image_bytes,
                                       high_bit_depth, is_client_side, load_image, resize_image,
                                       to_contract_pixels)
from restransfer.data.masks import (as_segmentation_data, from_mask_arrays, from_mask_csv, from_mask_npz,
                                    from_tfds_masks, read_mask, segmentation_folder)
from restransfer.data.pipeline import epoch_order, make_pipeline
from restransfer.data.sources import (BadImagesError, ImageData, SkippedFile, as_image_data, check_files,
                                      from_arrays, from_csv, from_npz, from_tfds, image_folder, sklearn_digits)
from restransfer.data.splits import (SPLIT_DIR_NAMES, Splits, content_digests, find_duplicates, find_split_dir,
                                     has_part, kfold, resolve_splits, split_groups, stratified_split,
                                     train_val_test_split, write_split)

__all__ = ["as_segmentation_data", "from_mask_arrays", "from_mask_csv", "from_mask_npz", "from_tfds_masks",
           "read_mask", "segmentation_folder", "IMAGE_EXTENSIONS", "SERVED_FORMATS", "SPLIT_DIR_NAMES", "BadImagesError", "ImageData", "SkippedFile",
           "Splits", "as_image_data", "check_files", "check_image", "content_digests", "decode_image_bytes",
           "epoch_order", "split_groups",
           "find_duplicates", "find_split_dir", "from_arrays", "from_csv", "from_npz", "from_tfds", "has_part",
           "high_bit_depth", "image_folder", "is_client_side", "kfold", "load_image", "make_pipeline", "resize_image",
           "resolve_splits", "sklearn_digits", "stratified_split", "to_contract_pixels", "train_val_test_split",
           "write_split"]
