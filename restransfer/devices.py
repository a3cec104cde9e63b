"""What hardware this process runs on, and the numeric precision and threads that suit it: the
one place that probes for GPUs and CPU features."""

from __future__ import annotations

import functools
import os


def gpu_count() -> int:
    """Physical GPUs TensorFlow can see."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@functools.lru_cache(maxsize=None)
def cpu_supports_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 matrix work natively (AVX512_BF16 or AMX-BF16), where
    oneDNN runs it at several times float32's rate. Read from /proc/cpuinfo (Linux); False
    elsewhere, so other machines keep float32."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def auto_precision() -> str:
    """What ``precision="auto"`` means on this machine: ``mixed_float16`` on a GPU, else
    ``float32`` (``RESTRANSFER_PRECISION`` in the environment chooses for every recipe)."""
    if os.environ.get("RESTRANSFER_PRECISION"):  # an explicit choice for every recipe of the process
        return os.environ["RESTRANSFER_PRECISION"]
    if gpu_count():
        return "mixed_float16"
    return "float32"


def configure_precision(precision: str = "auto") -> str:
    """Sets Keras' global dtype policy (``auto``: :func:`auto_precision`); returns the policy.
    The heads compute in float32 whatever the policy."""
    import keras

    if precision == "auto":
        precision = auto_precision()
    keras.mixed_precision.set_global_policy(precision)
    return precision


def apply_threads(threads: int) -> None:
    """TensorFlow's thread pools sized to ``threads`` cores (call before TensorFlow runs an op)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
