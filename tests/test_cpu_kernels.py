"""restransfer chooses TensorFlow's oneDNN CPU kernels, unless the user said otherwise."""

import os
import subprocess
import sys

import pytest

PROBE = ("import restransfer, tensorflow\n"
         "from tensorflow.python.util import _pywrap_util_port as port\n"
         "print(port.IsMklEnabled())")


def onednn_enabled(setting: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("setting, expected", [(None, True), ("0", False), ("1", True)])
def test_importing_restransfer_first_turns_onednn_on_unless_the_environment_says_no(setting, expected):
    assert onednn_enabled(setting) is expected
