"""Reading PyTorch checkpoints (``torch.save`` files) without PyTorch.

A ``.pth`` written by PyTorch >= 1.6 is a zip archive: ``<name>/data.pkl`` (a pickle of the
state dict in which each tensor refers to a raw storage) and ``<name>/data/<key>`` (the
storages' bytes). The pickle is read by a restricted unpickler that knows exactly the few
globals a state dict of tensors needs and refuses every other one, so no code in the file can
run (the same allow-list idea as ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

# torch.<Name>Storage -> the NumPy dtype of its elements
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The checkpoint asks for something a plain state dict of tensors never needs."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2: a view of ``storage`` -> a NumPy array (copied)."""
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset], copy=True)
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view, copy=True)


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return halves.view(np.float32)


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, source: str, byteorder: str):
        super().__init__(handle)
        self.archive, self.prefix, self.source, self.byteorder = archive, prefix, source, byteorder
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpoint(f"{self.source}: refuses to load {module}.{name} (a state dict of "
                               "tensors needs only tensors and dicts; nothing in the file is run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"{self.source}: unknown persistent id {pid!r:.60}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpoint(f"{self.source}: storage of unknown type {storage_type!r:.60}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            dtype = _STORAGE_DTYPES[storage_type.name]
            if dtype == "bfloat16":
                values = _bfloat16_to_float32(raw)
            else:
                values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(
                    "<" if self.byteorder == "little" else ">"))
            self.storages[key] = values
        return self.storages[key]


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save`` zip checkpoint as NumPy arrays, keyed as in the file;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip-format PyTorch checkpoint (PyTorch < 1.6 wrote another "
                         "format: re-save it with a current torch.save, or convert it to .safetensors)")
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as handle:
            state = _StateDictUnpickler(handle, archive, prefix, str(path), byteorder).load()
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
