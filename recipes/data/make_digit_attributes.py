"""Builds digit_attributes.npz: scikit-learn's bundled digits with three attribute labels
per image, a real multi-label task that needs no download.

    .venv/bin/python recipes/data/make_digit_attributes.py
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ATTRIBUTES = {
    "even": lambda d: d % 2 == 0,
    "above_four": lambda d: d > 4,
    "has_loop": lambda d: np.isin(d, [0, 6, 8, 9]),
}

digits = load_digits()
images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
labels = np.stack([rule(digits.target) for rule in ATTRIBUTES.values()], axis=1).astype(np.uint8)
train_x, val_x, train_y, val_y = train_test_split(images, labels, test_size=0.2, random_state=0,
                                                  stratify=digits.target)
np.savez_compressed(Path(__file__).with_name("digit_attributes.npz"), train_images=train_x,
                    train_labels=train_y, val_images=val_x, val_labels=val_y,
                    class_names=np.array(list(ATTRIBUTES)))
