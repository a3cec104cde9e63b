"""How long a weights preset takes to load once it is in the cache, and what the .pth reader costs.

Real ImageNet files cannot be downloaded here, so the cached files are the shared fixtures,
registered the way a user's files would be:
  * ResNet-50 through the hub preset ``timm_a1`` (imported with ``restransfer weights import``
    semantics into the restransfer cache; 47 MB float16 safetensors of the parity fixture),
  * ResNet-18 through a ``torchvision``-layout preset served once by a local HTTP server
    (the 45 MB stand-in ``.pth``), then loaded from the cache with the server gone.
Each figure is the median of ``--repeats`` builds in one process, after one warm-up build,
beside a ``weights=None`` build of the same network (so the difference is the weights).

    .venv/bin/python bench/weights_cache.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def timed(build, repeats):
    build()  # warm-up: imports, graph building caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        build()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="restransfer-cache-"))
    os.environ["RESTRANSFER_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"

    import restransfer as rt
    from restransfer.models import download, presets
    from restransfer.models.torch_files import read_torch_state_dict

    fixture = SHARED / "fixtures" / "parity" / "resnet50_random.safetensors"
    download.import_file(fixture, presets.get_preset("resnet50", "timm_a1"))
    shape = (224, 224, 3)
    r50 = timed(lambda: rt.build_backbone("resnet50", weights="timm_a1", input_shape=shape), args.repeats)
    r50_none = timed(lambda: rt.build_backbone("resnet50", weights=None, layout="torchvision",
                                               input_shape=shape), args.repeats)

    standin = SHARED / "weights" / "resnet18_standin.pth"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(standin.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    presets.register(presets.WeightsPreset(
        "resnet18", "bench_standin", "torchvision", "torch", standin.name,
        url=f"http://127.0.0.1:{server.server_address[1]}/{standin.name}",
        sha256=hashlib.sha256(standin.read_bytes()).hexdigest()))
    started = time.perf_counter()
    rt.build_backbone("resnet18", weights="bench_standin", input_shape=shape)
    first = time.perf_counter() - started
    server.shutdown()
    r18 = timed(lambda: rt.build_backbone("resnet18", weights="bench_standin", input_shape=shape), args.repeats)
    r18_none = timed(lambda: rt.build_backbone("resnet18", weights=None, input_shape=shape), args.repeats)
    pth = timed(lambda: read_torch_state_dict(standin), args.repeats)
    sha = timed(lambda: download.file_digests(standin), args.repeats)

    print(f"| what | median of {args.repeats} (s) |\n|---|---|")
    print(f"| ResNet-50 `timm_a1` from the cache (hash check + read + load), 224 px | {r50:.2f} |")
    print(f"| ResNet-50 same network, `weights=None` | {r50_none:.2f} |")
    print(f"| ResNet-18 first use: download from 127.0.0.1 + verify + cache + load | {first:.2f} (once) |")
    print(f"| ResNet-18 from the cache, server stopped | {r18:.2f} |")
    print(f"| ResNet-18 same network, `weights=None` | {r18_none:.2f} |")
    print(f"| reading the 45 MB stand-in `.pth` without PyTorch | {pth:.3f} |")
    print(f"| SHA-256 + MD5 of that file (the cache check) | {sha:.3f} |")


if __name__ == "__main__":
    main()
