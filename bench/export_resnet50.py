"""Export time, size and parity for a ResNet-50 classifier at 224 px (issue 6).

    .venv/bin/python bench/export_resnet50.py [--out /tmp/export-bench]

Random-init weights (ImageNet weights cannot be downloaded here): time and size do not
depend on the values. Prints one Markdown row.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import restransfer as rt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="export-bench-"))
    recipe = rt.ClassificationRecipe(backbone="resnet50", weights=None, class_names=["a", "b"],
                                     image_size=224)
    recipe.build()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (300, 260, 3), dtype=np.uint8) for _ in range(4)]
    started = time.perf_counter()
    directory = recipe.export(out, model_name="resnet50", warmup_images=images)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    import json

    card = json.loads((directory / "assets.extra" / "model_card.json").read_text())
    print("| model | export time (s) | size (MB) | parity max abs dprob |")
    print("|---|---|---|---|")
    print(f"| ResNet-50, 224 px, 2 classes | {seconds:.1f} | {size / 1e6:.1f} | "
          f"{card['export_parity_max_abs_diff']:.1e} |")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
