"""Weights presets by name: the table, download + verify + cache against a local HTTP server,
the Hugging Face hub through a hub-layout cache in offline mode, and importing a file."""

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import restransfer as rt
from restransfer.models import download, presets
from restransfer.models.weights import WeightsNotAvailable

from conftest import PARITY, REPO, STANDIN_WEIGHTS, require_shared


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def standin_features(model):
    images = np.load(require_shared(PARITY / "images_uint8.npy")).astype("float32")
    return model.predict(images, verbose=0)


def relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# What weights="imagenet" must mean for each depth: the preset with the best published top-1
# (torchvision's and timm's model cards, Keras' applications table), written out by hand.
IMAGENET_MEANS = {"resnet18": "torchvision_v1", "resnet34": "torchvision_v1", "resnet50": "timm_a1",
                  "resnet101": "torchvision_v2", "resnet152": "torchvision_v2", "resnet50v2": "keras",
                  "resnet101v2": "keras", "resnet152v2": "keras"}


@pytest.mark.parametrize("backbone", rt.list_backbones())
def test_every_depth_has_imagenet_weights_with_source_hash_and_figure(backbone):
    best = presets.get_preset(backbone, "imagenet")
    assert best.backbone == backbone and best.top1 and best.top1_source and best.license
    assert best.url or best.hub_repo
    assert best.sha256 or best.md5 or best.hub_revision  # pinned: the same file every time
    assert best.preprocessing in ("caffe", "tf", "torch")
    assert best.name == IMAGENET_MEANS[backbone]


class _Server:
    """Serves a folder on 127.0.0.1; ``truncate`` requests get half of the file."""

    def __init__(self, folder, truncate=0):
        self.requests, self.truncate = 0, truncate
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if outer.truncate:
                    outer.truncate -= 1
                    body = (folder / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])  # then the connection drops
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTRANSFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    shutil.copy(require_shared(STANDIN_WEIGHTS), folder / "resnet18-standin.pth")
    return folder


def register(name, url, sha256):
    return presets.register(presets.WeightsPreset(
        "resnet18", name, "torchvision", "torch", "resnet18-standin.pth", url=url, sha256=sha256,
        top1=44.8, top1_source="shared/weights/README.md (Tiny-ImageNet; a test stand-in)"))


def test_download_verify_cache_then_load_offline(served, cache):
    reference = np.load(require_shared(PARITY / "resnet18_features.npy"))
    with _Server(served) as server:
        register("local_standin", f"{server.url}/resnet18-standin.pth", sha256_of(served / "resnet18-standin.pth"))
        model = rt.build_backbone("resnet18", weights="local_standin", input_shape=(96, 96, 3))
        assert server.requests == 1
    assert relative_error(standin_features(model), reference) <= 1e-5
    cached = download.cached_path(presets.get_preset("resnet18", "local_standin"))
    assert cached.is_file() and cached.is_relative_to(cache)
    # the server is gone: the cache serves it, verified again
    started = time.perf_counter()
    again = rt.build_backbone("resnet18", weights="local_standin", input_shape=(96, 96, 3))
    assert time.perf_counter() - started < 30
    assert relative_error(standin_features(again), reference) <= 1e-5


def test_a_wrong_hash_is_refused_with_both_hashes_and_never_cached(served, cache):
    actual = sha256_of(served / "resnet18-standin.pth")
    with _Server(served) as server:
        register("wrong_hash", f"{server.url}/resnet18-standin.pth", "0" * 64)
        with pytest.raises(WeightsNotAvailable) as caught:
            rt.build_backbone("resnet18", weights="wrong_hash", input_shape=(32, 32, 3))
    message = str(caught.value)
    assert "0" * 64 in message and actual in message and "not cached" in message
    assert not any(p.is_file() for p in cache.rglob("*"))  # no file, no partial


def test_an_interrupted_transfer_is_retried(served, cache):
    with _Server(served, truncate=1) as server:
        preset = register("flaky", f"{server.url}/resnet18-standin.pth", sha256_of(served / "resnet18-standin.pth"))
        path = download.fetch(preset, progress=False)
        assert server.requests == 2
    assert sha256_of(path) == preset.sha256


def test_a_transfer_that_keeps_breaking_is_refused_and_not_cached(served, cache):
    with _Server(served, truncate=10) as server:
        preset = register("broken", f"{server.url}/resnet18-standin.pth", sha256_of(served / "resnet18-standin.pth"))
        with pytest.raises(download.DownloadError, match="after 3 attempt.*restransfer weights import"):
            download.fetch(preset, progress=False)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_file_urls_and_torchvision_hash_prefixes(served, cache):
    digest = sha256_of(served / "resnet18-standin.pth")
    preset = register("file_url", (served / "resnet18-standin.pth").as_uri(), digest[:8])  # as torch.hub checks
    assert download.fetch(preset, progress=False).read_bytes() == (served / "resnet18-standin.pth").read_bytes()


def _hub_cache(root, content_path, blob_name=None):
    """A Hugging Face hub cache holding timm/resnet50.a1_in1k's model.safetensors at the pinned revision."""
    preset = presets.get_preset("resnet50", "timm_a1")
    repo = root / "models--timm--resnet50.a1_in1k"
    blob = repo / "blobs" / (blob_name or sha256_of(content_path))
    blob.parent.mkdir(parents=True)
    shutil.copy(content_path, blob)
    snapshot = repo / "snapshots" / preset.hub_revision
    snapshot.mkdir(parents=True)
    (snapshot / preset.file_name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(preset.hub_revision)
    return root


HUB_PROBE = """
import json, sys, numpy as np, restransfer as rt
from restransfer.models.weights import WeightsNotAvailable
try:
    model = rt.build_backbone("resnet50", weights=sys.argv[1], input_shape=(96, 96, 3))
except WeightsNotAvailable as error:
    print(json.dumps({"error": str(error)})); sys.exit(0)
images = np.load(sys.argv[2]).astype("float32")
np.save(sys.argv[3], model.predict(images, verbose=0))
print(json.dumps({"ok": True}))
"""


def run_hub_probe(tmp_path, hub_cache, weights="imagenet", env=None):
    out = tmp_path / "features.npy"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache),
                   "RESTRANSFER_CACHE": str(tmp_path / "cache"), **(env or {})}
    result = subprocess.run([sys.executable, "-c", HUB_PROBE, weights, str(PARITY / "images_uint8.npy"), str(out)],
                            capture_output=True, text=True, env=environment, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), out


def test_hub_preset_loads_from_a_hub_cache_in_offline_mode(tmp_path):
    # resnet50's best preset is timm's, from the hub; its content here: the torchvision-keyed
    # parity fixture (timm ResNets use torchvision's key names)
    weights = require_shared(PARITY / "resnet50_random.safetensors")
    result, out = run_hub_probe(tmp_path, _hub_cache(tmp_path / "hf", weights))
    assert result == {"ok": True}
    assert relative_error(np.load(out), np.load(PARITY / "resnet50_features.npy")) <= 1e-4


def test_hub_cache_blob_that_is_not_its_hash_is_refused(tmp_path):
    weights = require_shared(PARITY / "resnet50_random.safetensors")
    result, _ = run_hub_probe(tmp_path, _hub_cache(tmp_path / "hf", weights, blob_name="ab" * 32))
    assert "ab" * 32 in result["error"] and sha256_of(weights) in result["error"]


def test_hub_preset_missing_offline_fails_fast_with_what_to_do(tmp_path):
    started = time.perf_counter()
    result, _ = run_hub_probe(tmp_path, tmp_path / "empty_hf_cache", weights="timm_a1")
    assert time.perf_counter() - started < 60
    assert "timm/resnet50.a1_in1k" in result["error"] and "restransfer weights download resnet50.timm_a1" in result["error"]


def test_cli_import_checks_the_hash_and_registers_the_file(tmp_path):
    env = {**os.environ, "RESTRANSFER_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "empty_hf")}

    def cli(*args):  # a process of its own: the preset registry and caches start empty
        return subprocess.run([sys.executable, "-m", "restransfer", *args], capture_output=True, text=True,
                              env=env, timeout=300, cwd=REPO)

    standin = require_shared(STANDIN_WEIGHTS)
    refused = cli("weights", "import", str(standin), "--as", "resnet18.torchvision_v1")
    assert refused.returncode == 1 and "f37072fd" in refused.stderr and sha256_of(standin) in refused.stderr
    unknown = cli("weights", "import", str(standin))
    assert unknown.returncode == 1 and "no known preset" in unknown.stderr
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    # a hub preset brought by hand (only the hub knows its hash): imported once it fits the network
    weights = require_shared(PARITY / "resnet50_random.safetensors")
    imported = cli("weights", "import", str(weights), "--as", "resnet50.timm_a1")
    assert imported.returncode == 0, imported.stderr[-1500:]
    result, out = run_hub_probe(tmp_path, tmp_path / "empty_hf", weights="timm_a1")
    assert result == {"ok": True}
    assert relative_error(np.load(out), np.load(PARITY / "resnet50_features.npy")) <= 1e-4


def test_the_package_requires_no_pytorch():
    from importlib.metadata import requires

    assert not [r for r in requires("restransfer") if r.lower().startswith("torch")]
