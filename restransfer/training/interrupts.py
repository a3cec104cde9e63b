"""Ctrl-C that is never lost. Python raises KeyboardInterrupt in whatever code runs when SIGINT
arrives; raised where errors are swallowed (a finalizer, a callback whose exceptions are
ignored), it vanishes and the run goes on -- seen once in the suite: a Ctrl-C sent just after
an epoch's checkpoint left a run that finished with exit 0. The CLI latches the signal; the
phase loop raises it again at the next batch end. Raised inside C code, it can also come out
changed: TensorFlow's converter returned "SystemError: <built-in method __array__ ...> returned a
result with an exception set" to a CI run's Ctrl-C, which then ended as a crash (exit 1), not an
interrupt (exit 130). Within the latch, an error raised after Ctrl-C is that Ctrl-C."""

from __future__ import annotations

import contextlib
import signal

import keras

_pressed = False


@contextlib.contextmanager
def latch_ctrl_c():
    """Within: SIGINT raises KeyboardInterrupt as usual and is remembered for
    :class:`RaisePendingInterrupt`; any exception that leaves the block after a Ctrl-C leaves it
    as KeyboardInterrupt, chained to what it became. The previous handler comes back on exit."""

    def handler(signum, frame):
        global _pressed
        _pressed = True
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    except Exception as error:
        if _pressed:
            raise KeyboardInterrupt from error
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        clear()


def clear() -> None:
    global _pressed
    _pressed = False


class RaisePendingInterrupt(keras.callbacks.Callback):
    """Raises a latched Ctrl-C at the next batch or epoch end, if the first raise was lost."""

    def _check(self, *args, **kwargs):
        if _pressed:
            raise KeyboardInterrupt

    on_train_batch_end = on_epoch_end = on_test_batch_end = _check
