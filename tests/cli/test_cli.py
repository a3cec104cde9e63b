"""The command line: fast help, exit codes, and the README's main job."""

import json
import os
import subprocess
import sys
import time

from restransfer import cli

from conftest import REPO, cli_in_fresh_process

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "restransfer", *args], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=timeout)


def test_help_is_fast_and_imports_no_tensorflow():
    started = time.perf_counter()
    result = run("--help")
    assert result.returncode == 0 and "quickstart" in result.stdout
    assert time.perf_counter() - started < 5  # typically ~0.1 s; TensorFlow alone takes ~4 s
    probe = subprocess.run([sys.executable, "-c", "import sys, restransfer.cli; "
                            "print('tensorflow' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_backbones_table_json():
    result = run("backbones", "--json")
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows][:2] == ["resnet18", "resnet34"]
    assert rows[0]["params"] == 11_186_112
    assert all(row["imagenet"] for row in rows)  # every depth has pretrained weights by name
    assert rows[0]["imagenet"] == "torchvision_v1" and rows[2]["imagenet"] == "timm_a1"
    keras_resnet50 = next(p for p in rows[2]["presets"] if p["name"] == "keras")
    assert keras_resnet50["md5"] and keras_resnet50["layout"] == "keras"


def test_bad_usage_exits_2():
    assert run("export").returncode == 2
    result = run("predict", "/nonexistent/model.keras", "x.jpg")
    assert result.returncode == 2 and "nonexistent" in result.stderr
    for command in ("predict", "evaluate", "export"):  # a wrong model path is said before TensorFlow loads
        extra = {"predict": ["x.jpg"], "evaluate": ["--data", "x"], "export": ["--out", "x"]}[command]
        code, tensorflow_loaded, _, checked = cli_in_fresh_process([command, "/nonexistent/model.keras", *extra], env=ENV)
        assert (code, tensorflow_loaded) == (2, False) and "/nonexistent/model.keras" in checked.stderr, checked


def test_quickstart_fine_tunes_and_exports(tmp_path, capsys):
    result = run("quickstart", "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "model.keras").exists()
    report = tmp_path / "run" / "report.html"
    assert 'id="summary"' in report.read_text() and f"report: {report}" in result.stdout
    assert (tmp_path / "run" / "export" / "restransfer" / "1" / "saved_model.pb").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5  # ten digit classes: chance is 0.1
    # the saved model through `restransfer predict` (in this process: the CLI's own code path)
    assert cli.main(["predict", str(tmp_path / "run" / "model.keras"), "--json",
                     str(REPO / "tests" / "fixtures" / "digit7.png")]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["results"][0]["top"][0]["class"] == "7" and answer["results"][0]["decision"] == "7"
    assert answer["decision_rule"] == "the most probable class"
