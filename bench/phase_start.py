"""What a phase costs before its first step (issue 28, and 31's start-up): the size of the traced
training step's graph, the time from ``fit`` to the end of a one-step phase (model build,
tracing, graph optimisation, the step), and the steady step after it.

    .venv/bin/python bench/phase_start.py                         # this checkout
    .venv/bin/python bench/phase_start.py --code /tmp/old         # another checkout's restransfer
    .venv/bin/python bench/phase_start.py --sizes 32 128 --repeats 3

ResNet-18, random init, a full phase (Adam with stage rates, one-cycle), batch 16, one
thread, one fresh process per measurement; the figures are the median of ``--repeats``.
Every suite test that trains pays this start once per phase, as does every user's run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE = r"""
import json, sys, time
size = int(sys.argv[1])
import restransfer as rt
from restransfer import Phase
import numpy as np, tensorflow as tf
from tensorflow.python.eager.polymorphic_function import tracing_compilation
create = tracing_compilation._create_concrete_function
ops = []
def counting(function_type, type_context, func_graph, tracing_options):
    concrete = create(function_type, type_context, func_graph, tracing_options)
    if tracing_options.name == "one_step_on_data":
        ops.append(len(concrete.graph.get_operations()))
    return concrete
tracing_compilation._create_concrete_function = counting
recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=size, num_classes=2, batch_size=16,
                                 phases=[Phase("all", epochs=1, lr=1e-3, lr_mult=0.5)],
                                 early_stopping_patience=None, augmentation="none")
rng = np.random.default_rng(0)
x, y = rng.integers(0, 255, (16, size, size, 3)).astype("uint8"), np.arange(16) % 2
started = time.perf_counter()
recipe.fit((x, y), validation_data=None, verbose=0)
first = time.perf_counter() - started
recipe.model.make_train_function()  # the phase's compiled step, already traced by fit
step = recipe.model.train_function
batches = iter(tf.data.Dataset.from_tensor_slices((x.astype("float32"), tf.one_hot(y, 2))).batch(16).repeat())
step(batches)
started = time.perf_counter()
for _ in range(5):
    step(batches)
print("RESULT " + json.dumps({"graph_ops": max(ops), "first_fit_s": first,
                              "step_s": (time.perf_counter() - started) / 5}))
"""


def measure(code: Path | None, size: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    out = subprocess.run([sys.executable, "-c", ONE, str(size)], capture_output=True, text=True, env=env,
                         cwd=code or Path(__file__).resolve().parents[1])
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(lines[-1][7:])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", type=Path, help="a checkout whose restransfer to measure (default: this one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| px | train-step graph ops | fit of a 1-step phase, s | steady step, s |\n|---|---|---|---|")
    for size in args.sizes:
        runs = [measure(args.code, size) for _ in range(args.repeats)]
        median = lambda key: statistics.median(r[key] for r in runs)
        print(f"| {size} | {runs[0]['graph_ops']} | {median('first_fit_s'):.1f} | {median('step_s'):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
