"""restransfer's TensorFlow graph functions, traced without AutoGraph.

AutoGraph rewrites a traced function's Python ``if``/``for`` on tensors into graph control
flow by parsing and recompiling its source, once per function per process. restransfer's
graph code writes its control flow explicitly (``tf.cond``, ``tf.map_fn``, Python branches on
Python values only), so that rewrite finds nothing to do and only costs time: ~1.6 s of a
fresh process's first fit, evaluation and export (bench/RESULTS.md, "The suite's time").
Without it, a tensor used as a Python bool fails loudly while tracing instead of being
converted quietly.

Every ``tf.function`` restransfer makes, and every function it hands to ``Dataset.map`` /
``flat_map`` / ``tf.map_fn``, goes through :func:`traced` or :func:`plain`.
"""

from __future__ import annotations


def traced(function=None, **options):
    """``tf.function(function, autograph=False, **options)``; usable as a decorator with options."""
    import tensorflow as tf

    if function is None:
        return lambda f: tf.function(f, autograph=False, **options)
    return tf.function(function, autograph=False, **options)


def plain(function):
    """``function`` marked for tf.data / ``tf.map_fn`` to trace as written (no AutoGraph)."""
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(function)
