#!/usr/bin/env bash
# ResNet-50 training throughput on a GPU: fp32 vs mixed_float16 vs mixed_float16 + XLA, at
# batch 128 and 256 (issue 8). A single prepared script, under 5 minutes, for a lent GPU
# machine (the `device` tool); needs a Python with tensorflow[and-cuda] there.
#   bash bench/gpu.sh > gpu_results.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" - <<'PYEOF'
import os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np, keras, tensorflow as tf
assert tf.config.list_physical_devices("GPU"), "no GPU visible"
rows = []
for batch in (128, 256):
    x = tf.random.uniform((batch, 224, 224, 3), 0, 255)
    y = tf.random.uniform((batch,), 0, 2, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(4)
    for name, policy, xla in (("fp32", "float32", False), ("mixed_float16", "mixed_float16", False),
                              ("mixed_float16 + XLA", "mixed_float16", True)):
        keras.backend.clear_session()
        keras.mixed_precision.set_global_policy(policy)
        inputs = keras.Input((224, 224, 3))
        base = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg")
        out = keras.layers.Dense(2, activation="softmax", dtype="float32")(base(inputs))
        model = keras.Model(inputs, out)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=xla,
                      steps_per_execution=10)
        model.fit(ds, steps_per_epoch=20, epochs=1, verbose=0)  # compile + warm up
        start = time.perf_counter()
        model.fit(ds, steps_per_epoch=50, epochs=1, verbose=0)
        rows.append((batch, name, 50 * batch / (time.perf_counter() - start)))
print("| batch | precision | img/s |\n|---|---|---|")
for batch, name, rate in rows:
    print(f"| {batch} | {name} | {rate:.0f} |")
PYEOF
