"""DICOM/NIfTI inputs with the real scans pydicom and nibabel ship, and windowing maths."""

import os

import numpy as np
import pytest

from restransfer import data
from restransfer.data import medical

pydicom = pytest.importorskip("pydicom", reason="the 'medical' extra (pydicom) is not installed")
nibabel = pytest.importorskip("nibabel", reason="the 'medical' extra (nibabel) is not installed")
from pydicom.data import get_testdata_file  # noqa: E402

NIFTI = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")


def test_window_maths():
    values = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])
    out = medical.apply_window(values, center=40, width=80)  # brain window: 0..80 HU
    np.testing.assert_allclose(out, [0.0, 0.0, 127.5, 255.0, 255.0])
    assert medical.WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    with pytest.raises(ValueError, match="width"):
        medical.apply_window(values, 0, 0)
    z = medical.normalize_intensity(np.array([1.0, 2.0, 3.0]), "zscore")
    assert z[1] == pytest.approx(127.5)


def test_ct_dicom_rescale_and_presets():
    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    lung = medical.read_dicom(path, window="lung")
    assert lung.shape == (128, 128, 1) and lung.dtype == np.float32
    np.testing.assert_allclose(lung[..., 0], medical.apply_window(hounsfield, -600, 1500), atol=1e-4)
    bone = medical.read_dicom(path, window=(400, 1800))
    assert not np.allclose(bone, lung)
    # no window in this file: robust percentile normalisation instead
    auto = medical.read_dicom(path, window="file")
    assert auto.min() == 0 and auto.max() == 255


def test_mr_dicom_uses_its_own_window_and_monochrome1_is_inverted(tmp_path):
    path = get_testdata_file("MR_small.dcm")
    dataset = pydicom.dcmread(path)
    own = medical.read_dicom(path)  # WindowCenter 600 / WindowWidth 1600 from the file
    np.testing.assert_allclose(own[..., 0], medical.apply_window(dataset.pixel_array.astype(float), 600, 1600), atol=1e-4)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "inverted.dcm")
    np.testing.assert_allclose(medical.read_dicom(tmp_path / "inverted.dcm"), 255.0 - own, atol=1e-4)


def test_nifti_slices_and_the_data_pipeline(tmp_path):
    volume = np.asarray(nibabel.load(NIFTI).dataobj)
    rows = medical.nifti_slices(NIFTI, "brain", slices=[5, 10])
    assert rows == [(f"{NIFTI}#5", "brain"), (f"{NIFTI}#10", "brain")]
    slice_ = medical.read_medical(f"{NIFTI}#5")
    assert slice_.shape == (volume.shape[1], volume.shape[0], 1)  # rotated for display
    # a CSV of DICOM files and NIfTI slices feeds the same pipeline as photos
    import shutil

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(NIFTI, tmp_path / "anat.nii")
    (tmp_path / "labels.csv").write_text("path,label\nct.dcm,ct\nanat.nii#5,mr\nanat.nii#10,mr\n")
    table = data.from_csv(tmp_path / "labels.csv", progress=False, decode_options={"window": "soft_tissue"})
    assert table.class_names == ["ct", "mr"] and not table.skipped
    images, labels = next(iter(data.make_pipeline(table, 32, 3)))
    assert images.shape == (3, 32, 32, 3) and labels.numpy().tolist() == [0, 1, 1]


def test_sixteen_bit_tiff_keeps_its_levels(tmp_path):
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "scan.tif")
    exact = data.load_image(tmp_path / "scan.tif", channels=1, keep_precision=True)
    np.testing.assert_allclose(exact[..., 0], ramp * (255 / 65535), rtol=1e-6)


def test_missing_extra_gives_one_clear_message(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'restransfer\[medical\]'"):
        medical.read_dicom(get_testdata_file("CT_small.dcm"))
