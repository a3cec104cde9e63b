"""Shared test helpers: where ../shared is, skips that say why, small synthetic images."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import restransfer  # noqa: F401  (before any TensorFlow import: it chooses TF's CPU kernels)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESTRANSFER_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "fixtures" / "parity"
STANDIN_WEIGHTS = SHARED / "weights" / "resnet18_standin.pth"
HYMENOPTERA = SHARED / "data" / "hymenoptera"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared test data beside the repo; see shared/README.md)")
    return path


def write_image(path: Path, array: np.ndarray, **save_args) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path


@pytest.fixture
def tiny_folder(tmp_path):
    """A two-class image folder: bright vs dark squares of mixed sizes and formats."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        for label, (low, high) in (("bright", (170, 255)), ("dark", (0, 85))):
            for i in range(count):
                size = int(rng.integers(20, 40))
                pixels = rng.integers(low, high, (size, size + 3, 3), dtype=np.uint8)
                suffix = ".png" if i % 2 else ".jpg"
                write_image(tmp_path / split / label / f"{label}{i}{suffix}", pixels)
    return tmp_path


def scans_npz(path, counts=(("train", 96), ("val", 40), ("test", 30)), positives=0.35, seed=0):
    """A MedMNIST-style .npz of 1-channel 28x28 'scans' (``<split>_images``, ``<split>_labels``
    of shape (N, 1)); a bright 8x8 square marks a lesion (label 1). Returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in counts:
        images = rng.uniform(20, 90, (count, 28, 28)).astype(np.uint8)
        labels = (rng.random(count) < positives).astype(np.int64)
        for image, label in zip(images, labels):
            if label:
                y, x = rng.integers(2, 18, 2)
                image[y:y + 8, x:x + 8] = 220
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return arrays
