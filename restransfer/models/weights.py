"""Which weights a ``weights`` argument means, and loading them into a backbone.

``weights`` is ``None`` (random init), a preset name (``"imagenet"`` = the best for the depth,
or ``"keras"``, ``"torchvision_v2"``, ... see :mod:`restransfer.models.presets`), or a file:
torchvision ``.pth``/``.pt``/``.safetensors`` state dicts (read without PyTorch) or Keras
``.weights.h5``/``.h5``/``.keras`` files. This machine may be offline, so every failure says
which file was looked for, where, and how to provide it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras
import numpy as np

from restransfer.models import presets as presets_lib
from restransfer.models.download import keras_cache_dir
from restransfer.models.stages import layers_by_name

TORCHVISION_SUFFIXES = (".pth", ".pt", ".safetensors")
KERAS_SUFFIXES = (".weights.h5", ".h5", ".keras")


class WeightsNotAvailable(RuntimeError):
    """The requested pretrained weights cannot be loaded (missing file, offline, mismatch)."""


def classify_weights(weights) -> str:
    """Returns "none", "preset", "torchvision" or "keras_file" for a ``weights`` argument."""
    if weights is None:
        return "none"
    if presets_lib.is_preset_name(weights):
        return "preset"
    path = Path(weights)
    name = path.name.lower()
    if name.endswith(TORCHVISION_SUFFIXES):
        kind = "torchvision"
    elif name.endswith(KERAS_SUFFIXES):
        kind = "keras_file"
    else:
        raise ValueError(
            f"weights={str(weights)!r}: expected None, a preset name ('imagenet', 'keras', "
            f"'torchvision_v1', 'torchvision_v2', 'timm_a1'; see `restransfer backbones`), or a file "
            f"ending in {', '.join(TORCHVISION_SUFFIXES + KERAS_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return kind


def preset_file(preset) -> Path:
    """The preset's verified file (downloaded into the cache on first use)."""
    from restransfer.models.download import DownloadError, fetch

    try:
        return fetch(preset)
    except DownloadError as error:
        raise WeightsNotAvailable(str(error)) from None


@contextlib.contextmanager
def explain_imagenet_failure(preset):
    """Turns a failed download/cache lookup of Keras' own ImageNet weights into one clear error."""
    try:
        yield
    except Exception as error:  # get_file raises bare Exception on URL failures
        text = str(error)
        if "URL fetch failure" not in text and not isinstance(error, (OSError, ValueError)):
            raise
        cache = keras_cache_dir() / "models"
        raise WeightsNotAvailable(
            f"Could not load {preset.id}: {preset.file_name} is not in Keras' cache ({cache}) and "
            f"downloading it failed ({text.splitlines()[0] if text else error!r}). On a machine with "
            f"internet run `restransfer weights download {preset.id}`, then copy {preset.file_name} "
            f"into {cache} (or point KERAS_HOME at a directory holding models/{preset.file_name}); "
            f"or bring the file and run `restransfer weights import FILE`."
        ) from error


def read_torchvision_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a torchvision ResNet state dict as float32 NumPy arrays, without PyTorch:
    ``.safetensors`` through the safetensors package, ``.pth``/``.pt`` through a restricted
    unpickler that runs nothing from the file (:mod:`restransfer.models.torch_files`)."""
    path = Path(path)
    if path.name.lower().endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
    else:
        from restransfer.models.torch_files import read_torch_state_dict

        try:
            tensors = read_torch_state_dict(path)
        except ValueError as error:
            raise WeightsNotAvailable(str(error)) from None
    return {k.removeprefix("module."): np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _torch_prefix(keras_layer_name: str) -> str | None:
    """conv3_block2_1_conv -> layer2.1.conv1 ; conv2_block1_0_bn -> layer1.0.downsample.1"""
    if keras_layer_name == "conv1_conv":
        return "conv1"
    if keras_layer_name == "conv1_bn":
        return "bn1"
    parts = keras_layer_name.split("_")
    if len(parts) != 4 or not parts[1].startswith("block"):
        return None
    stage, block, index, kind = int(parts[0][4:]) - 1, int(parts[1][5:]) - 1, parts[2], parts[3]
    base = f"layer{stage}.{block}."
    if index == "0":
        return base + ("downsample.0" if kind == "conv" else "downsample.1")
    return base + (f"conv{index}" if kind == "conv" else f"bn{index}")


def load_torchvision_weights(model: keras.Model, path) -> list[str]:
    """Loads a torchvision ResNet state dict into a torchvision-layout backbone.

    Returns the state-dict keys the backbone did not use (the ``fc`` classifier, counters).
    Raises :class:`WeightsNotAvailable` naming the file and key on any missing or
    mis-shaped tensor, so a wrong depth is never half-loaded.
    """
    state = read_torchvision_state_dict(path)
    used: set[str] = set()
    problems = []
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        if prefix is None:
            problems.append(f"layer {layer.name} has no torchvision counterpart")
            continue
        if isinstance(layer, keras.layers.Conv2D):
            keys = [f"{prefix}.weight"]
        else:
            keys = [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        missing = [k for k in keys if k not in state]
        if missing:
            problems.append(f"missing {', '.join(missing)}")
            continue
        values = [state[k] for k in keys]
        if isinstance(layer, keras.layers.Conv2D):
            values = [values[0].transpose(2, 3, 1, 0)]  # OIHW -> HWIO
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            problems.append(
                f"{keys[0]} has shape {values[0].shape}, layer {layer.name} needs {expected[0]}"
            )
            continue
        layer.set_weights(values)
        used.update(keys)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WeightsNotAvailable(
            f"{path} does not fit {model.name} (is it a torchvision {model.name}?): {shown}"
        )
    return sorted(k for k in state if k not in used)


# --- Keras files ---------------------------------------------------------------------------


def load_keras_weights(model: keras.Model, path) -> None:
    """Loads ``.weights.h5``/``.h5`` weights, or the matching layers of a ``.keras`` model."""
    path = Path(path)
    if not path.name.lower().endswith(".keras"):
        try:
            model.load_weights(str(path))
        except ValueError as error:
            raise WeightsNotAvailable(f"{path} does not fit {model.name}: {error}") from error
        return
    source = layers_by_name(keras.saving.load_model(str(path), compile=False, safe_mode=True))
    targets = [layer for layer in model.layers if layer.weights]
    missing = [layer.name for layer in targets if layer.name not in source]
    if missing:
        raise WeightsNotAvailable(
            f"{path} has no weights for {len(missing)} layers of {model.name} "
            f"(first: {', '.join(missing[:3])})"
        )
    for layer in targets:
        try:
            layer.set_weights(source[layer.name].get_weights())
        except ValueError as error:
            raise WeightsNotAvailable(f"{path}: layer {layer.name}: {error}") from error
