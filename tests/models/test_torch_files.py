"""The PyTorch-free .pth reader: torch.save's zip layout written here without PyTorch (the same
pickle opcodes torch emits: _rebuild_tensor_v2, typed storages as persistent ids), and the
refusal of anything else in the pickle."""

import collections
import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from restransfer.models.torch_files import UnsafeCheckpoint, read_torch_state_dict

from conftest import STANDIN_WEIGHTS, require_shared


class _Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, values


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


def write_pth(path, tensors: dict, byteorder="little"):
    """A torch.save-style zip: archive/data.pkl + archive/data/<key> + byteorder."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = lambda *args: None
    utils._rebuild_tensor_v2.__module__, utils._rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    kinds = {}
    for name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
        kinds[name] = type(name, (), {"__module__": "torch"})
        setattr(torch, name, kinds[name])
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", kinds[obj.kind], obj.key, "cpu", len(obj.values))
            return None

    try:
        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", byteorder)
        storages = {tensor.storage.key: tensor.storage.values for tensor in tensors.values()}
        for key, values in storages.items():
            archive.writestr(f"archive/data/{key}", values)
    return path


def test_float16_bfloat16_strided_and_offset_tensors(tmp_path):
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    half = _Storage("HalfStorage", "0", matrix.astype(np.float16).tobytes())
    bits = (matrix.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: the top 16 bits
    brain = _Storage("BFloat16Storage", "1", bits.tobytes())
    floats = _Storage("FloatStorage", "2", np.arange(20, dtype=np.float32).tobytes())
    path = write_pth(tmp_path / "w.pth", {
        "half": _Tensor(half, 0, (3, 4), (4, 1)),
        "bf16": _Tensor(brain, 0, (3, 4), (4, 1)),
        "transposed": _Tensor(floats, 0, (4, 3), (1, 4)),   # a .t() view: non-contiguous
        "offset": _Tensor(floats, 12, (2, 2), (2, 1)),      # a view into the same storage
    })
    state = read_torch_state_dict(path)
    np.testing.assert_array_equal(state["half"], matrix)
    np.testing.assert_array_equal(state["bf16"], matrix)  # small integers are exact in bfloat16
    np.testing.assert_array_equal(state["transposed"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(state["offset"], [[12, 13], [14, 15]])


def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": Exploit()}, protocol=2))
    with pytest.raises(UnsafeCheckpoint, match=r"evil.pth: refuses to load (posix|os)\.system"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_legacy_non_zip_checkpoints_get_a_clear_error(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="old.pth is not a zip-format PyTorch checkpoint"):
        read_torch_state_dict(path)


def test_the_standin_reads_every_tensor():
    state = read_torch_state_dict(require_shared(STANDIN_WEIGHTS))
    assert state["conv1.weight"].shape == (64, 3, 7, 7) and state["conv1.weight"].dtype == np.float32
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    assert len(state) == 122  # every entry of torchvision's resnet18 state dict
