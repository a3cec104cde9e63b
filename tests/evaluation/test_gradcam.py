"""Grad-CAM points at what the classifier learned to look at."""

import numpy as np

import restransfer as rt
from restransfer.evaluation.gradcam import grad_cam, overlay_png
from restransfer.training.phases import Phase


def squares(count, rng, size=64):
    images = rng.uniform(40, 90, (count, size, size, 3)).astype(np.uint8)
    labels = np.arange(count) % 2
    corners = rng.integers(4, size - 20, (count, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        if label:
            image[y:y + 16, x:x + 16] = 250  # the planted bright square
    return images, labels, corners


def test_grad_cam_highlights_the_planted_square(tmp_path):
    rng = np.random.default_rng(0)
    images, labels, _ = squares(64, rng)
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=64, batch_size=16,
                                     augmentation="none", early_stopping_patience=None, val_fraction=0,
                                     phases=[Phase("all", epochs=5, lr=2e-3, schedule="one_cycle")],
                                     class_names=["plain", "square"])
    recipe.fit((images, labels), verbose=0)
    test_images, _, corners = squares(8, np.random.default_rng(1))
    inside, outside = [], []
    for image, (y, x) in zip(test_images[1::2], corners[1::2]):
        heat = grad_cam(recipe.model, image, stage="stage3", class_index=1)
        assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1
        mask = np.zeros((64, 64), bool)
        mask[y:y + 16, x:x + 16] = True
        inside.append(heat[mask].mean())
        outside.append(heat[~mask].mean())
    assert np.mean(inside) > 2 * np.mean(outside), (inside, outside)
    overlay_png(test_images[1], heat, tmp_path / "cam.png")
    assert (tmp_path / "cam.png").read_bytes()[:4] == b"\x89PNG"
