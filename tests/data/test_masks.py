"""Image/mask pairs: every bad pair named before training, values checked against the classes,
masks moved with their images by every augmentation preset and never given new classes."""

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from restransfer import data
from restransfer.data.augmentation import PRESETS, Augmenter

from conftest import write_image


def pair(root, stem, image, mask, mask_mode=None, image_suffix=".jpg"):
    write_image(root / "images" / f"{stem}{image_suffix}", image)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, mode=mask_mode).save(root / "masks" / f"{stem}.png") if mask_mode else \
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def square(size=(40, 48), at=(8, 10), side=12, value=1):
    image = np.full(size + (3,), 40, np.uint8)
    mask = np.zeros(size, np.uint8)
    image[at[0]:at[0] + side, at[1]:at[1] + side] = 220
    mask[at[0]:at[0] + side, at[1]:at[1] + side] = value
    return image, mask


def test_every_bad_pair_is_named_and_skipped_or_refused(tmp_path):
    root = tmp_path / "pairs"
    for i in range(3):
        pair(root, f"good{i}", *square())
    pair(root, "empty", np.full((40, 48, 3), 40, np.uint8), np.zeros((40, 48), np.uint8))  # allowed, counted
    image, mask = square()
    pair(root, "resized", image, mask[:30])                                 # mask of another size
    write_image(root / "images" / "lonely.jpg", image)                      # image without a mask
    Image.fromarray(mask).save(root / "masks" / "orphan.png")               # mask without an image
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg")             # unreadable image
    (root / "masks" / "broken.png").write_bytes(Image.fromarray(mask).tobytes()[:10])
    (root / "images" / "badmask.jpg").write_bytes((root / "images" / "good0.jpg").read_bytes())
    (root / "masks" / "badmask.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable mask
    colour = np.zeros((40, 48, 3), np.uint8)
    colour[..., 0] = mask
    pair(root, "colour", image, colour * 100)                                 # a colour mask

    source = data.segmentation_folder(root, progress=False)
    assert len(source) == 4 and source.empty_masks == 1 and source.class_names == ["background", "class_1"]
    reasons = {s.path.split("/")[-1]: s.reason for s in source.skipped}
    assert reasons["resized.jpg"] == "mask resized.png is 48x30, its image 48x40"
    assert "no mask for it" in reasons["lonely.jpg"] and "a mask without an image" in reasons["orphan.png"]
    assert reasons["broken.jpg"].startswith("not an image") or "damaged" in reasons["broken.jpg"]
    assert "mask badmask.png cannot be used" in reasons["badmask.jpg"]
    assert "a colour mask" in reasons["colour.jpg"]
    with pytest.raises(data.BadImagesError, match="resized.jpg"):
        data.segmentation_folder(root, policy="strict", progress=False)


def test_binary_masks_saved_as_0_255_are_refused_with_the_fix_or_mapped(tmp_path):
    root = tmp_path / "white"
    for i in range(3):
        image, mask = square(value=255)
        pair(root, f"m{i}", image, mask)
    with pytest.raises(ValueError, match=r"mask values \[0, 255\].*mask_values: \{0: 0, 255: 1\}"):
        data.segmentation_folder(root, progress=False)
    mapped = data.segmentation_folder(root, mask_values={0: 0, 255: 1}, progress=False)
    assert set(np.unique(data.read_mask(mapped.masks[0], mapped.mask_values)).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="value 2 is in"):
        data.segmentation_folder(root, mask_values={0: 0, 255: 2}, class_names=["background", "polyp"],
                                 progress=False)


def test_palette_and_16_bit_masks_give_class_ids_and_ignore_index_is_allowed(tmp_path):
    root = tmp_path / "kinds"
    image, mask = square()
    mask = mask * 2  # class 2
    mask[0, :] = 255  # a border without truth
    palette = Image.fromarray(mask, mode="P")
    palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255, 255, 255] * 253)  # colours are display only
    write_image(root / "images" / "p.png", image)
    (root / "masks").mkdir(parents=True)
    palette.save(root / "masks" / "p.png")
    write_image(root / "images" / "s.png", image)
    Image.fromarray(mask.astype(np.uint16)).save(root / "masks" / "s.png")
    source = data.segmentation_folder(root, ignore_index=255, class_names=["bg", "a", "b"], progress=False)
    for path in source.masks:
        assert set(np.unique(data.read_mask(path)).tolist()) == {0, 2, 255}
    assert list(source.labels) == [2, 2]  # each pair's stratum: its most frequent foreground class


def test_masks_from_arrays_npz_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 20, 24, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (6, 20, 24)).astype(np.uint8)
    source = data.from_mask_arrays(images, masks, channels=1)
    assert source.channels == 1 and source.num_classes == 3 and source.images.shape == (6, 20, 24, 1)
    with pytest.raises(ValueError, match="its image's size"):
        data.from_mask_arrays(images, masks[:, :10])
    np.savez(tmp_path / "pairs.npz", images=images, masks=masks, val_images=images[:2], val_masks=masks[:2])
    assert len(data.as_segmentation_data(str(tmp_path / "pairs.npz"), split="val")) == 2
    root = tmp_path / "csv"
    for i in range(2):
        pair(root, f"c{i}", *square())
    (root / "list.csv").write_text("image,mask,patient\n" + "".join(
        f"images/c{i}.jpg,masks/c{i}.png,p{i}\n" for i in range(2)))
    listed = data.as_segmentation_data(str(root / "list.csv"), csv={"group_column": "patient"})
    assert len(listed) == 2 and list(listed.groups) == ["p0", "p1"]
    (root / "escape.csv").write_text("image,mask\n../../outside.jpg,masks/c0.png\n")
    with pytest.raises(ValueError, match="escapes the data root"):
        data.as_segmentation_data(str(root / "escape.csv"))


@pytest.mark.parametrize("preset", [name for name in PRESETS if name != "none"])
def test_every_preset_moves_the_mask_with_its_image_and_keeps_class_ids(preset):
    """A planted pattern: bright pixels exactly where the mask says 1 (a square and a bar, so a
    flip or a shift that moved only one of the two would show), class 2 elsewhere in a corner."""
    augmenter = Augmenter(preset, 48)
    image = np.full((48, 48, 3), 30, np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    image[6:20, 8:22] = 230
    mask[6:20, 8:22] = 1
    image[30:34, 5:40] = 230
    mask[30:34, 5:40] = 1
    mask[40:, 40:] = 2
    moved_any = False
    for seed in range(12):
        out, out_mask = augmenter(image, seed, mask)
        assert out_mask.dtype == np.uint8 and set(np.unique(out_mask).tolist()) <= {0, 1, 2}
        bright = out.mean(axis=-1) > 130  # colour changes of +-20 % leave 230 well above and 30 below
        marked = out_mask == 1
        # away from the edges (where the image is interpolated and the mask is not), the bright
        # pixels are exactly the marked ones: a mask moved differently from its image fails here
        inside = binary_erosion(marked, iterations=2)
        outside = binary_erosion(~marked, iterations=2)
        assert bright[inside].mean() > 0.99 and (~bright[outside]).mean() > 0.99, seed
        moved_any |= not np.array_equal(out_mask, mask)
    assert moved_any, "the preset never moved anything"


def test_decoded_once_masks_are_the_masks_of_every_epoch(tmp_path):
    root = tmp_path / "pairs"
    for i in range(5):
        pair(root, f"m{i}", *square(at=(4 + i, 6 + i)))
    source = data.segmentation_folder(root, progress=False)
    cached = data.make_pipeline(source, 32, 2, training=True, augmentation="segmentation", epochs=1, cache_pixels=True)
    fresh = data.make_pipeline(source, 32, 2, training=True, augmentation="segmentation", epochs=1, cache_pixels=False)
    for (a_images, a_masks), (b_images, b_masks) in zip(cached, fresh):
        np.testing.assert_array_equal(a_masks.numpy(), b_masks.numpy())
        np.testing.assert_allclose(a_images.numpy(), b_images.numpy(), atol=1.0)  # the cache rounds once to uint8
