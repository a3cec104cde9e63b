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


ITEMSIZE = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8}


class _Storage:
    """A storage as torch.save writes it; ``numel`` and ``key`` may lie (hostile files)."""

    def __init__(self, kind, key, values, numel=None, entry=None):
        self.kind, self.key, self.values = kind, key, values
        self.numel = len(values) // ITEMSIZE[kind] if numel is None else numel
        self.entry = key if entry is None else entry  # the zip entry actually written


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


def write_pth(path, tensors: dict, byteorder="little", compress=False, pickled=None):
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
                return ("storage", kinds[obj.kind], obj.key, "cpu", obj.numel)
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
        archive.writestr("archive/data.pkl", pickled if pickled is not None else buffer.getvalue())
        archive.writestr("archive/byteorder", byteorder)
        storages = {t.storage.entry: t.storage.values for t in tensors.values() if isinstance(t.storage, _Storage)}
        for key, values in storages.items():
            archive.writestr(f"archive/data/{key}", values,
                             compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
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


FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


def _floats(**storage):
    return _Storage("FloatStorage", storage.pop("key", "0"), storage.pop("values", FOUR_FLOATS), **storage)


# Each file describes its tensors in a way no torch.save writes; each must be refused, never
# read memory outside a storage, never crash the process (the reader used to build
# as_strided views from these numbers unchecked: the first read ~400 words of the heap, the
# second died with a segmentation fault).
HOSTILE = {
    "size past the storage": dict(tensors={"w": _Tensor(_floats(), 0, (4096,), (1,))}),
    "stride past the storage": dict(tensors={"w": _Tensor(_floats(), 0, (1 << 20,), (1 << 20,))}),
    "offset past the storage": dict(tensors={"w": _Tensor(_floats(), 3, (2,), (1,))}),
    "offset beyond the end": dict(tensors={"w": _Tensor(_floats(), 99, (), ())}),
    "negative offset": dict(tensors={"w": _Tensor(_floats(), -2, (2,), (1,))}),
    "negative stride": dict(tensors={"w": _Tensor(_floats(), 3, (4,), (-1,))}),
    "negative size": dict(tensors={"w": _Tensor(_floats(), 0, (-4,), (1,))}),
    "size and stride of different lengths": dict(tensors={"w": _Tensor(_floats(), 0, (2, 2), (1,))}),
    "a float size": dict(tensors={"w": _Tensor(_floats(), 0, (2.5,), (1,))}),
    "a string stride": dict(tensors={"w": _Tensor(_floats(), 0, (2,), ("1",))}),
    "a boolean size": dict(tensors={"w": _Tensor(_floats(), 0, (True,), (1,))}),
    "a list for a size": dict(tensors={"w": _Tensor(_floats(), 0, [4], (1,))}),
    "more elements than the storage (stride 0)": dict(tensors={"w": _Tensor(_floats(), 0, (1 << 40,), (0,))}),
    "too many dimensions": dict(tensors={"w": _Tensor(_floats(), 0, (1,) * 40, (1,) * 40)}),
    "element count that lies": dict(tensors={"w": _Tensor(_floats(numel=1 << 30), 0, (4,), (1,))}),
    "element count that is negative": dict(tensors={"w": _Tensor(_floats(numel=-1), 0, (1,), (1,))}),
    "bytes not a whole number of elements": dict(tensors={"w": _Tensor(_floats(values=b"123456"), 0, (1,), (1,))}),
    "a storage entry that is missing": dict(tensors={"w": _Tensor(_floats(entry="other"), 0, (4,), (1,))}),
    "a storage key that climbs out": dict(tensors={"w": _Tensor(_floats(key="../secret"), 0, (4,), (1,))}),
    "one key, two sizes": dict(tensors={"a": _Tensor(_floats(), 0, (4,), (1,)),
                                        "b": _Tensor(_floats(numel=2, values=FOUR_FLOATS[:8]), 0, (2,), (1,))}),
    "a compressed storage (a zip bomb's way)": dict(tensors={"w": _Tensor(_floats(), 0, (4,), (1,))}, compress=True),
    "an unknown byte order": dict(tensors={"w": _Tensor(_floats(), 0, (4,), (1,))}, byteorder="middle"),
    "a tensor built on a string": dict(tensors={"w": _Tensor("not a storage", 0, (4,), (1,))}),
    "deeply nested lists, not a dict": dict(tensors={}, pickled=b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."),
    "two data.pkl": dict(tensors={"w": _Tensor(_floats(entry="../x/data.pkl"), 0, (4,), (1,))}),
    "a truncated pickle": dict(tensors={}, pickled=b"\x80\x02}q\x00(X\x01\x00\x00\x00a"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_checkpoint_is_refused_naming_the_problem(tmp_path, case):
    path = write_pth(tmp_path / "hostile.pth", **HOSTILE[case])
    with pytest.raises(UnsafeCheckpoint, match="hostile.pth: "):
        read_torch_state_dict(path)


def test_hostile_files_are_refused_in_a_process_that_survives(tmp_path):
    """The segfault case, in a child process: it must end with the error, not a signal."""
    import subprocess

    path = write_pth(tmp_path / "crash.pth", **HOSTILE["stride past the storage"])
    code = ("import sys; from restransfer.models.torch_files import read_torch_state_dict, UnsafeCheckpoint\n"
            f"try: read_torch_state_dict({str(path)!r})\nexcept UnsafeCheckpoint: sys.exit(3)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 3


def test_a_real_view_at_the_storages_very_end_is_read(tmp_path):
    floats = _floats()
    path = write_pth(tmp_path / "edge.pth", {"last": _Tensor(floats, 3, (1,), (1,)),
                                             "scalar": _Tensor(floats, 2, (), ()),
                                             "empty": _Tensor(floats, 4, (0, 3), (3, 1))})
    state = read_torch_state_dict(path)
    np.testing.assert_array_equal(state["last"], [3.0])
    assert state["scalar"] == 2.0 and state["empty"].shape == (0, 3)
