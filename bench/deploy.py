"""Deploy formats side by side (issue 30): SavedModel, LiteRT float32/float16/int8 and ONNX --
file size, single-image latency, batch throughput on this CPU, and the held-out accuracy.

    .venv/bin/python bench/deploy.py                 # ResNet-18 (stand-in, ants/bees) and ResNet-50, 224 px
    .venv/bin/python bench/deploy.py --nets resnet18 --size 224

ResNet-18: the stand-in weights (../shared/weights, Tiny-ImageNet, NOT ImageNet) with a head
trained on ../shared/data/hymenoptera/train (6 epochs on cached features, the backbone
frozen: a few minutes on 2 cores); scored on hymenoptera/val (153 images) through each format's
runtime, images made by ``reference_pixels``. ResNet-50: random weights (no pretrained file
here), so speed and size only. Latency: the median of 20 single-image calls after 3 warm-up
calls; throughput: batches of 16 (LiteRT: its input resized to 16), best of 3. Each export is
checked against Keras by restransfer itself (exports that disagree are refused).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS = SHARED / "weights" / "resnet18_standin.pth"


def timed(call, batch):
    for _ in range(3):
        call(batch[:1])
    single = statistics.median([_duration(call, batch[:1]) for _ in range(20)])
    throughput = max(len(batch) / _duration(call, batch) for _ in range(3))
    return single * 1000, throughput


def _duration(call, pixels):
    started = time.perf_counter()
    call(pixels)
    return time.perf_counter() - started


def litert_caller(blob: bytes, batch: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreters = {}

    def call(pixels):
        n = len(pixels)
        if n not in interpreters:
            interpreter = Interpreter(model_content=blob, num_threads=2)
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [n, *pixels.shape[1:]])
            interpreter.allocate_tensors()
            interpreters[n] = interpreter
        interpreter = interpreters[n]
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
        interpreter.invoke()
        return {("probabilities" if np.dtype(d["dtype"]).kind == "f" else "predictions"): interpreter.get_tensor(d["index"])
                for d in interpreter.get_output_details()}

    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    import onnxruntime
    import tensorflow as tf

    import restransfer as rt
    from restransfer.serving import portable

    print("| net | format | file MB | latency ms (1 image) | images/s (batch 16) | val accuracy | agreement with Keras |")
    print("|---|---|---|---|---|---|---|")
    out = Path(tempfile.mkdtemp(prefix="restransfer-deploy-"))
    for net in args.nets:
        trained = net == "resnet18"
        recipe = rt.ClassificationRecipe(backbone=net, weights=str(WEIGHTS) if trained else None, image_size=args.size,
                                         augmentation="none", early_stopping_patience=None, val_fraction=0,
                                         phases=[rt.Phase("head", epochs=6, lr=3e-3)],
                                         class_names=["ants", "bees"])
        if trained:
            recipe.fit(str(DATA / "train"), verbose=0)
        else:
            recipe.build()
        val = rt.data.image_folder(DATA / "val", class_names=recipe.class_names, progress=False)
        train = rt.data.image_folder(DATA / "train", class_names=recipe.class_names, progress=False)
        pixels = np.stack([portable.reference_pixels(p, args.size, 3) for p in val.paths])
        keras_decided = np.asarray(recipe.decision.decide(recipe.model.predict(pixels, verbose=0), recipe.class_names))
        batch = pixels[:16]

        saved = recipe.export(out / net / "saved_model", warmup_images=val.paths[:2])
        signature = tf.saved_model.load(str(saved)).signatures["predict_images"]
        call = lambda p: signature(images=tf.constant(p))
        latency, throughput = timed(call, batch)
        decided = np.concatenate([call(pixels[i:i + 16])["predictions"].numpy() for i in range(0, len(pixels), 16)])
        size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file() and "assets.extra" not in str(f))
        print(f"| {net} | SavedModel | {size / 2**20:.1f} | {latency:.1f} | {throughput:.1f} | "
              f"{format(np.mean(decided == val.labels), '.3f') if trained else '– (random weights)'} | {np.mean(decided == keras_decided):.3f} |",
              flush=True)
        for fmt, quantization in (("litert", None), ("litert", "float16"), ("litert", "int8"), ("onnx", None)):
            directory = recipe.export(out / net / f"{fmt}_{quantization}", format=fmt, quantization=quantization,
                                      heldout=val, representative=train, allow_drop=True, max_metric_drop=1.0)
            blob = (directory / portable.FILE_NAMES[fmt]).read_bytes()
            if fmt == "litert":
                call = litert_caller(blob, 16)
            else:
                session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
                call = lambda p, s=session: dict(zip(["probabilities", "predictions"],
                                                     s.run(["probabilities", "predictions"], {"pixels": p})))
            latency, throughput = timed(call, batch)
            decided = np.concatenate([call(pixels[i:i + 16])["predictions"] for i in range(0, len(pixels), 16)])
            label = f"{'LiteRT' if fmt == 'litert' else 'ONNX'} {quantization or 'float32'}"
            print(f"| {net} | {label} | {len(blob) / 2**20:.1f} | {latency:.1f} | {throughput:.1f} | "
                  f"{format(np.mean(decided == val.labels), '.3f') if trained else '– (random weights)'} | "
                  f"{np.mean(decided == keras_decided):.3f} |", flush=True)


if __name__ == "__main__":
    main()
