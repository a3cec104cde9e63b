"""A/B of restransfer's CPU training step between two checkouts, alternating runs so the VM's
drift hits both alike (issue 31): the step of ``bench/cpu_training.py``, from this tree and from
another (a ``git worktree`` of the commit to compare with).

    git worktree add ../base-tree df7123b
    .venv/bin/python bench/cpu_training_ab.py ../base-tree --net resnet18 --size 128 --threads 2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu_training import RESTRANSFER  # noqa: E402


def step_speed(tree: Path, net, size, threads, batch) -> float:
    # the tree first on sys.path: its restransfer, not the installed one
    out = subprocess.run([sys.executable, "-c", RESTRANSFER, net, str(size), str(threads), str(batch), "auto"],
                         capture_output=True, text=True, cwd=tree,
                         env={**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["train"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout")
    parser.add_argument("--net", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trees = {"this": Path(__file__).resolve().parents[1], "other": args.other.resolve()}
    speeds = {name: [] for name in trees}
    for run in range(args.runs):
        order = list(trees) if run % 2 == 0 else list(reversed(trees))
        for name in order:
            speeds[name].append(step_speed(trees[name], args.net, args.size, args.threads, args.batch))
            print(f"{name}: {speeds[name][-1]:.1f} img/s", flush=True)
    for name, values in speeds.items():
        print(f"{name} ({trees[name]}): mean {sum(values) / len(values):.1f} img/s over {values}")


if __name__ == "__main__":
    main()
