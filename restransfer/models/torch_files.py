"""Reading PyTorch checkpoints (``torch.save`` files) without PyTorch.

A ``.pth`` written by PyTorch >= 1.6 is a zip archive: ``<name>/data.pkl`` (a pickle of the
state dict in which each tensor refers to a raw storage) and ``<name>/data/<key>`` (the
storages' bytes). The pickle is read by a restricted unpickler that knows exactly the few
globals a state dict of tensors needs and refuses every other one, so no code in the file can
run (the same allow-list idea as ``torch.load(weights_only=True)``).

Nothing the file says is trusted before it is checked: the zip entries it names, their sizes
and compression, the byte order, each storage's element count against its bytes, and every
tensor's offset, shape and strides against its storage (a view may not reach one element
past it, nor hold more elements than it). A file that fails any check raises
:class:`UnsafeCheckpoint` naming the problem; no view outside a storage is ever made.
"""

from __future__ import annotations

import collections
import pickle
import re
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
_ITEMSIZE = {name: (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize) for name, dtype in _STORAGE_DTYPES.items()}

MAX_PICKLE_BYTES = 64 * 2**20      # a ResNet-152 state dict's pickle is ~100 KB
MAX_STORAGE_BYTES = 8 * 2**30      # larger than any ResNet checkpoint by far
MAX_DIMENSIONS = 8
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # torch names storages 0, 1, 2, ...


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The checkpoint asks for something a plain state dict of tensors never needs, or
    describes its tensors inconsistently (a view outside its storage, sizes that lie)."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A storage's elements, read and checked; only these can back a tensor."""

    def __init__(self, values: np.ndarray):
        self.values = values


def _count(value, what: str, source: str, low: int = 0, high: int = 2**62) -> int:
    # bool is an int to Python, never a size to torch
    if type(value) is not int or not low <= value <= high:
        raise UnsafeCheckpoint(f"{source}: {what} must be an integer in [{low}, {high}], got {value!r:.60}")
    return value


def _view(storage, offset, size, stride, source: str) -> np.ndarray:
    """A copy of the tensor ``storage[offset]`` viewed with ``size``/``stride``, after checking
    that every element it reads lies inside the storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpoint(f"{source}: a tensor is built on {type(storage).__name__}, not on a storage")
    values = storage.values
    length = len(values)
    offset = _count(offset, "a tensor's storage offset", source, high=length)
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride) \
            or len(size) > MAX_DIMENSIONS:
        raise UnsafeCheckpoint(f"{source}: a tensor's size {size!r:.80} and stride {stride!r:.80} must be tuples "
                               f"of the same length (at most {MAX_DIMENSIONS})")
    size = tuple(_count(s, "a tensor dimension", source, high=length) for s in size)
    stride = tuple(_count(s, "a tensor stride", source, high=length) for s in stride)
    elements = int(np.prod(size, dtype=np.int64)) if size else 1
    if elements == 0:
        return np.zeros(size, dtype=values.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))  # the furthest element read
    if last >= length:
        raise UnsafeCheckpoint(f"{source}: a tensor of size {size} and stride {stride} at offset {offset} reads "
                               f"element {last} of a storage of {length}")
    if elements > length:
        raise UnsafeCheckpoint(f"{source}: a tensor of {elements} elements on a storage of {length} "
                               "(state dicts never repeat a storage's elements)")
    if not size:
        return np.array(values[offset], copy=True)
    itemsize = values.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(values[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view, copy=True)


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return halves.view(np.float32)


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, source: str, byteorder: str):
        super().__init__(handle)
        self.archive, self.prefix, self.source, self.byteorder = archive, prefix, source, byteorder
        self.storages: dict[str, tuple[str, _Storage]] = {}
        self.entries = {info.filename: info for info in archive.infolist()}

    def find_class(self, module, name):
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpoint(f"{self.source}: refuses to load {module}.{name} (a state dict of "
                               "tensors needs only tensors and dicts; nothing in the file is run)")

    def _rebuild_tensor(self, storage=None, offset=None, size=None, stride=None, *_ignored):
        """torch._utils._rebuild_tensor_v2: a checked view of ``storage`` -> a NumPy array (copied)."""
        return _view(storage, offset, size, stride, self.source)

    def _rebuild_parameter(self, data=None, *_ignored):
        if not isinstance(data, np.ndarray):
            raise UnsafeCheckpoint(f"{self.source}: a parameter wraps {type(data).__name__}, not a tensor")
        return data

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"{self.source}: unknown persistent id {pid!r:.60}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpoint(f"{self.source}: storage of unknown type {storage_type!r:.60}")
        if not isinstance(key, str) or not _STORAGE_KEY.match(key):
            raise UnsafeCheckpoint(f"{self.source}: storage key {key!r:.60} is not a plain name")
        itemsize = _ITEMSIZE[storage_type.name]
        numel = _count(numel, f"storage {key}'s element count", self.source, high=MAX_STORAGE_BYTES // itemsize)
        if key in self.storages:
            kind, storage = self.storages[key]
            if kind != storage_type.name or len(storage.values) != numel:
                raise UnsafeCheckpoint(f"{self.source}: storage {key} is named twice with different types or sizes")
            return storage
        entry = self.entries.get(f"{self.prefix}data/{key}")
        if entry is None:
            raise UnsafeCheckpoint(f"{self.source}: storage {key} has no entry {self.prefix}data/{key}")
        if entry.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses storages
            raise UnsafeCheckpoint(f"{self.source}: storage {key} is compressed ({entry.compress_type})")
        if entry.file_size != numel * itemsize:
            raise UnsafeCheckpoint(f"{self.source}: storage {key} declares {numel} elements of {itemsize} bytes "
                                   f"but holds {entry.file_size} bytes")
        raw = self.archive.read(entry)
        if len(raw) != entry.file_size:
            raise UnsafeCheckpoint(f"{self.source}: storage {key} is truncated")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype == "bfloat16":
            values = _bfloat16_to_float32(raw if self.byteorder == "little" else
                                          np.frombuffer(raw, ">u2").astype("<u2").tobytes())
        else:
            values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<" if self.byteorder == "little" else ">"))
        storage = _Storage(values)
        self.storages[key] = (storage_type.name, storage)
        return storage


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save`` zip checkpoint as NumPy arrays, keyed as in the file;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped. Raises
    :class:`UnsafeCheckpoint` for anything a state dict of tensors does not need or any
    inconsistency in how the file describes its tensors."""
    path = Path(path)
    source = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip-format PyTorch checkpoint (PyTorch < 1.6 wrote another "
                         "format: re-save it with a current torch.save, or convert it to .safetensors)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UnsafeCheckpoint(f"{source}: not a readable zip archive ({error})") from None
    with archive:
        pickles = [info for info in archive.infolist()
                   if info.filename.endswith("/data.pkl") or info.filename == "data.pkl"]
        if len(pickles) != 1:
            raise UnsafeCheckpoint(f"{source}: expected one data.pkl in the archive, found {len(pickles)}")
        if pickles[0].file_size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpoint(f"{source}: data.pkl declares {pickles[0].file_size} bytes (at most "
                                   f"{MAX_PICKLE_BYTES} for a state dict)")
        prefix = pickles[0].filename[: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder")[:16].decode(errors="replace").strip()
            if byteorder not in ("little", "big"):
                raise UnsafeCheckpoint(f"{source}: byte order {byteorder!r} is neither 'little' nor 'big'")
        try:
            with archive.open(pickles[0]) as handle:
                state = _StateDictUnpickler(handle, archive, prefix, source, byteorder).load()
        except UnsafeCheckpoint:
            raise
        except RecursionError:
            raise UnsafeCheckpoint(f"{source}: data.pkl nests too deeply for a state dict") from None
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, AttributeError, IndexError,
                zipfile.BadZipFile, MemoryError, OverflowError) as error:
            raise UnsafeCheckpoint(f"{source}: data.pkl is not a valid state dict pickle "
                                   f"({type(error).__name__}: {str(error)[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UnsafeCheckpoint(f"{source}: holds a {type(state).__name__}, not a state dict")
    return {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
