"""Medical image inputs: DICOM and NIfTI, windowing and intensity normalisation.

pydicom and nibabel are an optional extra (``pip install 'restransfer[medical]'``); without
them a DICOM or NIfTI file gets one clear message. Every reader returns float32 (H, W, 1)
on a 0-255 scale, so medical images enter the same pipeline as photos, at full precision.
"""

from __future__ import annotations

import os
import re

import numpy as np

# CT windows, (centre, width) in Hounsfield units.
WINDOW_PRESETS = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 400.0),
    "liver": (60.0, 160.0),
}

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


_NIFTI_SLICE = re.compile(r"^(.*\.nii(?:\.gz)?)#(\d+)$", re.IGNORECASE)


def split_slice(path) -> tuple[str, int | None]:
    """``volume.nii.gz#40`` -> (``volume.nii.gz``, 40); any other path (``#`` is an ordinary
    character in file names) -> (path, None)."""
    match = _NIFTI_SLICE.match(str(path))
    return (match.group(1), int(match.group(2))) if match else (str(path), None)


def is_medical(path) -> bool:
    return split_slice(path)[0].lower().endswith(DICOM_SUFFIXES + NIFTI_SUFFIXES)


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {what} needs {module}: pip install 'restransfer[medical]'") from None


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: ``center - width/2`` -> 0, ``center + width/2`` -> 255, clipped."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = center - width / 2.0
    return (np.clip((values - low) / width, 0.0, 1.0) * 255.0).astype(np.float32)


def normalize_intensity(values: np.ndarray, method: str = "percentile", low: float = 0.5,
                        high: float = 99.5) -> np.ndarray:
    """Maps raw intensities to 0-255: ``minmax``, ``percentile`` (clip to the [low, high]
    percentiles first, robust to hot pixels) or ``zscore`` (mean 0, sd 1, then +-3 sd span
    0-255)."""
    values = np.asarray(values, dtype=np.float64)
    if method == "auto":  # what a medical recipe means by default
        method = "percentile"
    if method == "zscore":
        sd = values.std() or 1.0
        return apply_window((values - values.mean()) / sd, 0.0, 6.0)
    if method == "percentile":
        lower, upper = np.percentile(values, [low, high])
    elif method == "minmax":
        lower, upper = values.min(), values.max()
    else:
        raise ValueError(f"normalisation must be 'minmax', 'percentile' or 'zscore', got {method!r}")
    return apply_window(values, (lower + upper) / 2.0, max(upper - lower, 1e-6))


def _first(value):
    if value is None:
        return None
    try:
        return float(value[0])  # multi-valued DICOM attribute
    except (TypeError, IndexError):
        return float(value)


def read_dicom(path, window="file", normalize: str = "percentile") -> np.ndarray:
    """One DICOM slice: modality rescale (slope/intercept) applied, then a window: ``"file"``
    (the file's WindowCenter/Width, else ``normalize``), a preset name, or (centre, width);
    MONOCHROME1 inverted so bright means dense everywhere."""
    pydicom = _require("pydicom", f"DICOM file {path}")
    dataset = pydicom.dcmread(str(path))
    values = dataset.pixel_array.astype(np.float64)
    if values.ndim == 3 and values.shape[-1] != 3:
        values = values[values.shape[0] // 2]  # multi-frame: the middle frame
    values = values * float(dataset.get("RescaleSlope", 1) or 1) + float(dataset.get("RescaleIntercept", 0) or 0)
    if window == "file" and dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        image = apply_window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth))
    elif isinstance(window, str) and window in WINDOW_PRESETS:
        image = apply_window(values, *WINDOW_PRESETS[window])
    elif isinstance(window, (tuple, list)):
        image = apply_window(values, float(window[0]), float(window[1]))
    elif window in ("file", None):
        image = normalize_intensity(values, normalize)
    else:
        raise ValueError(f"unknown window {window!r}; presets: {', '.join(WINDOW_PRESETS)}")
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 255.0 - image
    return image[..., None] if image.ndim == 2 else image


def read_nifti_slice(path, index: int | None = None, axis: int = 2, window=None,
                     normalize: str = "percentile") -> np.ndarray:
    """One 2-D slice of a NIfTI volume (``index`` along ``axis``; default the middle one),
    normalised over the whole volume so slices of one scan share a scale."""
    nibabel = _require("nibabel", f"NIfTI file {path}")
    volume = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float64)
    if volume.ndim == 4:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {volume.shape}")
    index = volume.shape[axis] // 2 if index is None else int(index)
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"{path}: slice {index} outside 0..{volume.shape[axis] - 1} on axis {axis}")
    if isinstance(window, str) and window in WINDOW_PRESETS:
        scaled = apply_window(np.take(volume, index, axis=axis), *WINDOW_PRESETS[window])
    elif isinstance(window, (tuple, list)):
        scaled = apply_window(np.take(volume, index, axis=axis), float(window[0]), float(window[1]))
    else:
        lower, upper = (np.percentile(volume, [0.5, 99.5]) if normalize in ("percentile", "auto")
                        else (volume.min(), volume.max()))
        scaled = apply_window(np.take(volume, index, axis=axis), (lower + upper) / 2, max(upper - lower, 1e-6))
    return np.ascontiguousarray(np.rot90(scaled))[..., None]  # radiological display orientation


def read_medical(path, window="file", normalize: str = "percentile", axis: int = 2) -> np.ndarray:
    """DICOM or NIfTI (``volume.nii.gz#40`` selects slice 40) as float32 (H, W, 1), 0-255."""
    name, index = split_slice(path)
    if name.lower().endswith(DICOM_SUFFIXES):
        return read_dicom(name, window, normalize)
    return read_nifti_slice(name, index, axis, None if window == "file" else window, normalize)


def nifti_slices(path, label: str, slices=None, axis: int = 2) -> list[tuple[str, str]]:
    """(``path#index``, label) rows for chosen slices of a volume (default: all), ready for
    :func:`restransfer.data.from_csv` or a DataFrame."""
    nibabel = _require("nibabel", f"NIfTI file {path}")
    depth = nibabel.load(str(path)).shape[axis]
    chosen = range(depth) if slices is None else slices
    return [(f"{os.fspath(path)}#{i}", label) for i in chosen]


__all__ = ["WINDOW_PRESETS", "apply_window", "normalize_intensity", "read_dicom", "read_nifti_slice",
           "read_medical", "nifti_slices", "is_medical"]
