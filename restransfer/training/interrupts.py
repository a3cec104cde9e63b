"""Ctrl-C that is never lost. Python raises KeyboardInterrupt in whatever code runs when SIGINT
arrives; raised where errors are swallowed (a finalizer, a callback whose exceptions are
ignored), it vanishes and the run goes on -- seen once in the suite: a Ctrl-C sent just after
an epoch's checkpoint left a run that finished with exit 0. The CLI latches the signal; the
phase loop raises it again at the next batch end."""

from __future__ import annotations

import contextlib
import signal

import keras

_pressed = False


@contextlib.contextmanager
def latch_ctrl_c():
    """Within: SIGINT raises KeyboardInterrupt as usual and is remembered for
    :class:`RaisePendingInterrupt`. The previous handler comes back on exit."""

    def handler(signum, frame):
        global _pressed
        _pressed = True
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
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
