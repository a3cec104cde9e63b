"""Grad-CAM (Selvaraju et al. 2017) for any stage of a restransfer classifier."""

from __future__ import annotations

import numpy as np

from restransfer.models import stages as stages_lib


def grad_cam(model, image: np.ndarray, stage: str = "stage4", class_index: int | None = None) -> np.ndarray:
    """Heat map (H, W) in [0, 1] at the image's size: which regions of ``stage``'s output
    pushed the score of ``class_index`` (default: the predicted class) up.

    ``image``: raw pixels (H, W, C) at the model's input size.
    """
    import keras
    import tensorflow as tf

    from restransfer.models.heads import find_head

    backbone = stages_lib.find_backbone(model)
    layers = stages_lib.stage_layers(backbone)[stage]
    if not layers:
        raise ValueError(f"{backbone.name} has no layers in {stage}")
    probe = keras.Model(backbone.inputs, [layers[-1].output, backbone.output])
    head = find_head(model)
    pixels = tf.convert_to_tensor(np.asarray(image, dtype=np.float32)[None])
    with tf.GradientTape() as tape:
        feature_map, pooled = probe(pixels, training=False)
        probabilities = head(pooled, training=False)
        if class_index is None:  # the decided class: the model's own rule (e.g. a threshold)
            class_index = int(tf.argmax(probabilities[0])) if head.multi_label else \
                int(head.decision.decide(probabilities, head.class_names)[0])
        score = probabilities[:, class_index]
    gradients = tape.gradient(score, feature_map)
    if gradients is None:
        raise ValueError(f"no gradient from the head to {stage}")
    weights = tf.reduce_mean(gradients, axis=(1, 2))  # one weight per channel
    cam = tf.nn.relu(tf.reduce_sum(feature_map * weights[:, None, None, :], axis=-1))[0]
    cam = tf.image.resize(cam[..., None], image.shape[:2], method="bilinear")[..., 0].numpy()
    top = cam.max()
    return cam / top if top > 0 else cam


def overlay_png(image: np.ndarray, heatmap: np.ndarray, path, alpha: float = 0.45, display: int = 256) -> None:
    """Writes a PNG of the image and, beside it, the image with the heat map laid over it
    (jet colour map), each upsampled to ``display`` pixels so a small input can be read."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    base = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    colour = colormaps["jet"](heatmap)[..., :3] * 255.0
    blended = (1 - alpha) * base + alpha * colour
    scale = max(1, -(-display // max(base.shape[:2])))
    panels = [Image.fromarray(p.astype(np.uint8)).resize((base.shape[1] * scale, base.shape[0] * scale),
                                                          Image.Resampling.BICUBIC) for p in (base, blended)]
    sheet = Image.new("RGB", (panels[0].width * 2 + 8, panels[0].height), "white")
    sheet.paste(panels[0], (0, 0))
    sheet.paste(panels[1], (panels[0].width + 8, 0))
    sheet.save(path)
