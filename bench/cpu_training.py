"""Training speed on the CPU: restransfer's own training step against the same loop in PyTorch,
side by side in one run (issue 31).

    .venv/bin/python bench/cpu_training.py                       # ResNet-18/50, 128/224 px, 1/2 threads
    .venv/bin/python bench/cpu_training.py --torch /tmp/torchenv/bin/python --nets resnet18 --sizes 128

restransfer: a ClassificationRecipe's model compiled by its objective for a full phase (Adam,
its stage-rate optimizer, one-cycle schedule: what ``fit`` runs), trained through Keras ``fit``
on random pixels (batch 32, 10 classes, random init), under each precision: ``float32`` and
``mixed_bfloat16`` -- and ``auto``, what the recipe chooses on this CPU. PyTorch (when a Python
with torch + torchvision is given; restransfer never depends on it): torchvision's model,
Adam, cross-entropy, fp32, NCHW and channels-last (the faster is reported), ``torch.set_num_threads``.
Each configuration runs in a fresh process, one warm-up epoch, then the best of three epochs
of 6 steps (restransfer: the last four of five epochs of one ``fit`` call on an endless input, as
a phase runs, timed by a callback) (this VM's cores are shared and its timings noisy). Images per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESTRANSFER = r"""
import json, sys, time
net, size, threads, batch, precision = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
weights = sys.argv[6] if len(sys.argv) > 6 else None
import restransfer as rt   # first, as a user's script would
from restransfer.devices import apply_threads, configure_precision
apply_threads(threads)
import numpy as np
from restransfer import Phase
recipe = rt.ClassificationRecipe(backbone=net, weights=weights, image_size=size, num_classes=10, precision=precision)
model = recipe.build()
chosen = configure_precision(precision)
phase = Phase("all", epochs=1, lr=1e-3, schedule="one_cycle", lr_mult=0.4)
from restransfer.models import stages
from restransfer.training.objectives import ClassificationObjective
from restransfer.training.optimizers import make_optimizer
stages.set_trainable_stages(model, stages.parse_stages("all"))
objective = ClassificationObjective(10)
objective.compile(model, make_optimizer(model, phase, 6), phase)
x = np.random.default_rng(0).uniform(0, 255, (6 * batch, size, size, 3)).astype("float32")
y = np.eye(10, dtype="float32")[np.random.default_rng(1).integers(0, 10, 6 * batch)]
import keras
import tensorflow as tf
class EpochTimes(keras.callbacks.Callback):
    times = []
    def on_epoch_begin(self, epoch, logs=None): self.started = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None): self.times.append(time.perf_counter() - self.started)
# One endless input, as a recipe's fit feeds a phase (training/caching.py): a finite one, or a fit
# call per epoch, makes Keras build a new iterator every epoch, and tearing the old one down
# waits for tf.data's autotuning thread -- ~4 s idle an epoch here at 128 px, which the earlier
# figures of this benchmark counted as training time.
data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch).prefetch(tf.data.AUTOTUNE)
model.fit(data, steps_per_epoch=6, epochs=5, verbose=0, callbacks=[EpochTimes()])
train = 6 * batch / min(EpochTimes.times[1:])  # the first epoch warms up
print(json.dumps({"train": train, "precision": chosen}))
"""

TORCH = r"""
import json, sys, time
net, size, threads, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import torch, torchvision
torch.set_num_threads(threads)
results = {}
for layout in ("nchw", "channels_last"):
    model = getattr(torchvision.models, net)(num_classes=10)
    x = torch.rand(6 * batch, 3, size, size) * 255
    y = torch.randint(0, 10, (6 * batch,))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss = torch.nn.CrossEntropyLoss()
    model.train()
    def epoch():
        for start in range(0, len(x), batch):
            optimizer.zero_grad()
            loss(model(x[start:start + batch] / 255), y[start:start + batch]).backward()
            optimizer.step()
    epoch()
    times = []
    for _ in range(3):
        started = time.perf_counter(); epoch(); times.append(time.perf_counter() - started)
    results[layout] = 6 * batch / min(times)
print(json.dumps(results))
"""


def run(code, *args, python=sys.executable, env=None):
    out = subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--torch", default=None, help="a Python with torch and torchvision")
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16", "auto"])
    parser.add_argument("--weights", nargs="+", default=[], metavar="NET=FILE",
                        help="a weights file for a net, e.g. resnet50=../shared/fixtures/parity/resnet50_random.safetensors: "
                             "a torchvision file builds the torchvision layout (v1.5, no conv biases: PyTorch's network "
                             "and what the imagenet presets load); without one ResNet-50+ is Keras' layout (v1, conv biases)")
    args = parser.parse_args()
    weights = dict(pair.split("=", 1) for pair in args.weights)
    from restransfer.devices import cpu_supports_bfloat16

    print(f"{os.cpu_count()} cores; AVX512_BF16/AMX here: {cpu_supports_bfloat16()}; batch {args.batch}; images/s\n")
    # PyTorch's default layout is NCHW; channels-last is the faster one here: both are shown, and
    # the ratios are against the faster (the bar)
    columns = [f"restransfer {p}" for p in args.precisions] + (
        ["PyTorch fp32 NCHW (its default)", "PyTorch fp32 (best layout)", "auto / PyTorch", "fp32 / PyTorch",
         "auto / PyTorch NCHW"] if args.torch else [])
    print("| net | px | threads | " + " | ".join(columns) + " |")
    print("|" + "---|" * (3 + len(columns)))
    for net in args.nets:
        for size in args.sizes:
            for threads in args.threads:
                ours = {p: run(RESTRANSFER, net, size, threads, args.batch, p, *([weights[net]] if net in weights else []))
                        for p in args.precisions}
                cells = [f"{ours[p]['train']:.1f}" + (f" ({ours[p]['precision']})" if p == "auto" else "")
                         for p in args.precisions]
                if args.torch:
                    theirs = run(TORCH, net, size, threads, args.batch, python=args.torch)
                    best = max(theirs.values())
                    auto = ours.get('auto', ours[args.precisions[-1]])['train']
                    cells += [f"{theirs['nchw']:.1f}", f"{best:.1f} ({max(theirs, key=theirs.get)})",
                              f"{auto / best:.2f}",
                              f"{ours['float32']['train'] / best:.2f}" if "float32" in ours else "-",
                              f"{auto / theirs['nchw']:.2f}"]
                label = f"{net} ({Path(weights[net]).name})" if net in weights else net
                print(f"| {label} | {size} | {threads} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
