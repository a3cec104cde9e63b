"""The image contract measured as the serving issue measured it: max |dprob| between
``recipe.predict(path)`` and the exported ``serving_default(original bytes)``, per kind of file,
for ResNet-18 with the shared stand-in weights at 64 px and two different random heads.

    .venv/bin/python bench/image_contract.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

ROWS = [
    ("JPEG with EXIF orientation 6 (a phone photo)", ["exif6.jpg"]),
    ("JPEG, all EXIF orientations 1-8", [f"exif{i}.jpg" for i in range(1, 9)]),
    ("RGBA PNG with transparent background", ["rgba.png"]),
    ("LA PNG, palette PNG with a transparent index, 16-bit gray PNG", ["la.png", "palette.png", "gray16.png"]),
    ("progressive / grayscale / CMYK JPEG, JPEG with trailing bytes",
     ["progressive.jpg", "gray.jpg", "cmyk.jpg", "trailing.jpg"]),
    ("BMP, animated GIF (first frame), WebP", ["image.bmp", "animated.gif", "image.webp"]),
]


def main():
    import tensorflow as tf

    import restransfer as rt
    from serving.test_image_contract import build_corpus

    standin = REPO.parent / "shared" / "weights" / "resnet18_standin.pth"
    work = Path(tempfile.mkdtemp(prefix="contract-"))
    corpus = build_corpus(work / "corpus")
    results = {label: [] for label, _ in ROWS}
    tiff = []
    for seed in (0, 1):
        recipe = rt.ClassificationRecipe(backbone="resnet18", weights=str(standin), image_size=64,
                                         class_names=["a", "b", "c", "d"], seed=seed)
        import keras

        keras.utils.set_random_seed(seed)
        recipe.build()
        export = tf.saved_model.load(str(recipe.export(work / f"export{seed}")))
        serve = export.signatures["serving_default"]
        for label, names in ROWS:
            for name in names:
                by_path = recipe.predict([corpus[name]])[0]
                by_bytes = serve(image_bytes=tf.constant([corpus[name].read_bytes()]))["probabilities"].numpy()[0]
                results[label].append(float(np.abs(by_path - by_bytes).max()))
        try:
            serve(image_bytes=tf.constant([corpus["image.tiff"].read_bytes()]))
            tiff.append("served")
        except tf.errors.InvalidArgumentError:
            tiff.append("refused by serving_default (card: decode client-side, send predict_images)")
    print("| image | max abs difference in probability, `recipe.predict(path)` vs `serving_default(bytes)` (2 heads) |")
    print("|---|---|")
    for label, values in results.items():
        print(f"| {label} | {max(values):.1e} |")
    print(f"| TIFF | {tiff[0]} |")


if __name__ == "__main__":
    main()
