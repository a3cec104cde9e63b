"""Shared test helpers: where ../shared is, skips that say why, small synthetic images."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # several workers on two cores: one thread each (measured ~15 % faster than two each, which
    # fight over the cores); the subprocesses tests start inherit it
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np
import pytest

import restransfer  # noqa: F401  (before any TensorFlow import: it chooses TF's CPU kernels)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESTRANSFER_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "fixtures" / "parity"
STANDIN_WEIGHTS = SHARED / "weights" / "resnet18_standin.pth"
HYMENOPTERA = SHARED / "data" / "hymenoptera"


@pytest.fixture(autouse=True)
def _float32_after_each_test():
    """A test that trains in mixed precision (Keras' global dtype policy) must not leave it set."""
    yield
    if "keras" in __import__("sys").modules:
        import keras

        keras.mixed_precision.set_global_policy("float32")


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared test data beside the repo; see shared/README.md)")
    return path


def cli_in_fresh_process(args, env=None, timeout=300):
    """``restransfer.cli.main(args)`` in a new Python: (exit code, whether TensorFlow was
    loaded, seconds, the completed process); (None, None, None, process) if it printed no answer."""
    import subprocess
    import sys

    probe = ("import sys, time; started = time.perf_counter(); from restransfer.cli import main\n"
             f"code = main({list(map(str, args))!r}); "
             "print(code, 'tensorflow' in sys.modules, round(time.perf_counter() - started, 2))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=timeout)
    fields = result.stdout.split()[-3:]
    if len(fields) != 3 or not fields[0].lstrip("-").isdigit():
        return None, None, None, result
    return int(fields[0]), fields[1] == "True", float(fields[2]), result


def write_image(path: Path, array: np.ndarray, **save_args) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path


@pytest.fixture
def tiny_folder(tmp_path):
    """A two-class image folder: bright vs dark squares of mixed sizes and formats."""
    return bright_dark_folder(tmp_path)


def bright_dark_folder(root, train_per_class=12, val_per_class=6):
    """``root/{train,val}/{bright,dark}/``: squares of 20..39 px, PNG and JPEG alternately."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, (low, high) in (("bright", (170, 255)), ("dark", (0, 85))):
            for i in range(count):
                size = int(rng.integers(20, 40))
                pixels = rng.integers(low, high, (size, size + 3, 3), dtype=np.uint8)
                suffix = ".png" if i % 2 else ".jpg"
                write_image(root / split / label / f"{label}{i}{suffix}", pixels)
    return root


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


def write_pairs(root, count, channels, classes, seed, ignore=None):
    """Squares of a brighter shade per class on a dark background, images of varied sizes
    (JPEG for RGB, PNG for grey), masks as class-index PNGs; a 1-pixel ignore border."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(3, count // 3))):
        for i in range(n):
            h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), np.uint8)
            for cls in range(1, classes):
                y, x = int(rng.integers(0, h - 14)), int(rng.integers(0, w - 14))
                image[y:y + 14, x:x + 14] = 90 + 80 * cls
                mask[y:y + 14, x:x + 14] = cls
            if ignore is not None:
                mask[0, :] = ignore
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image)
            if channels == 1:
                picture.convert("L").save(root / split / "images" / f"im {i}.png")
            else:
                picture.save(root / split / "images" / f"im {i}.jpg", quality=95)
            Image.fromarray(mask).save(root / split / "masks" / f"im {i}.png")
    return root


# The modules that take longest go to the workers first, so no long module is left running
# alone at the end (longest-processing-time-first; seconds measured with three workers on 2
# cores, a clone of 28a4cb8, 2026-12-05). xdist would otherwise order modules by their number of tests
# (many quick ones first): ``--no-loadscope-reorder`` in pyproject.toml keeps this order. Order
# only: every test still runs.
LONGEST_FIRST = ["training/test_training.py",          # 193 s
                 "tasks/test_segmentation.py",         # 152
                 "training/test_distribute.py",        # 141
                 "serving/test_decision_rule.py",      # 128
                 "cli/test_runs.py",                   # 117
                 "tasks/test_classification.py",       # 113
                 "cli/test_resume_matrix.py",          # 110
                 "serving/test_portable.py",           # 93
                 "serving/test_image_contract.py",     # 76
                 "cli/test_segmentation_run.py",       # 74
                 "cli/test_cross_validation.py",       # 68
                 "cli/test_cli.py",                    # 60
                 "models/test_presets.py",             # 55
                 "evaluation/test_report_browser.py",  # 50
                 "tasks/test_medical_recipe.py",       # 50
                 "serving/test_export.py",             # 48
                 "cli/test_newcomer.py",               # 42
                 "models/test_backbones.py",           # 37
                 "data/test_data.py",                  # 18
                 "test_cpu_kernels.py",                # 16
                 "evaluation/test_gradcam.py"]         # 14


def pytest_collection_modifyitems(items):
    def rank(item):
        path = str(item.path.relative_to(REPO / "tests")) if item.path.is_relative_to(REPO / "tests") else ""
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a module the order is kept
