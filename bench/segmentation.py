"""Segmentation benchmark (issue 29): restransfer's default against training from scratch and a
frozen encoder, on Kvasir-SEG, with the stand-in ResNet-18.

    .venv/bin/python bench/segmentation.py                  # the runs (resumable), then the table
    .venv/bin/python bench/segmentation.py --report-only    # the table from runs.jsonl
    .venv/bin/python bench/segmentation.py --size 256 --seeds 0   # the 256 px row

Data: ../shared/data/kvasir_seg, the dataset authors' split (train 880, val 120), 128 px.
Backbone: ResNet-18 with ../shared/weights/resnet18_standin.pth (Tiny-ImageNet; NOT ImageNet).
Every plan gets the same 12 epochs, batch 16, the ``segmentation`` augmentation preset, the
default loss (cross-entropy + soft Dice), threshold 0.5, no early stopping and no validation
during training: each run is scored once at the end, on val's 120 images at their own sizes
(``recipe.evaluate``): per-image Dice (mean over images) and dataset Dice (pixels pooled).

Plans: ``default`` (segmentation's ``two_phase``: the decoder 3 epochs with the encoder frozen
-- its BatchNorm adapting --, then everything 9 epochs at one rate, the task's ``lr_mult``),
``from scratch`` (the same plan, random encoder), ``frozen encoder`` (the decoder only, 12
epochs), ``discriminative rates`` (the default with classification's ``lr_mult`` 0.4: the
default until 2026-12-02; its runs were recorded as ``default``, and its from-scratch runs as
``from scratch``, before the relabelling to the names below). Seeds 0-2.
Each run is a subprocess (its own peak memory); two run at a time, one thread each (much of
a run's start is single-threaded tracing). Margins: the mean per-image Dice difference over
seeds, its SE combining the seed term (sd of per-seed differences / sqrt(seeds)) and the
image term (sd over images of the seed-averaged per-image difference / sqrt(images)).

Run it in a checkout nobody edits while it runs (autograph reads functions' source from disk),
with the package imported from there, not from the editable install's checkout:
    git worktree add ../bench-tree HEAD && cd ../bench-tree   # beside ../shared, as the repo is
    PYTHONPATH=$PWD /path/to/.venv/bin/python bench/segmentation.py ...

Inference: images/s through the exported SavedModel's ``serving_default`` from JPEG bytes
(batches of 16 val files), measured after the default's seed-0 run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "kvasir_seg"
WEIGHTS = SHARED / "weights" / "resnet18_standin.pth"
OUT = REPO / "bench" / "segmentation"
PLANS = ("default", "from scratch", "frozen encoder", "discriminative rates", "from scratch, discriminative rates")
EPOCHS = 12


def run_one(plan: str, seed: int, size: int, threads: int, out_dir: Path, precision: str = "float32",
            holdout: float = 0.0) -> dict:
    """One training run in this process; returns its figures."""
    import resource

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import restransfer as rt
    from restransfer.tasks.registry import default_lr_mult
    from restransfer.tasks.segmentation import SegmentationRecipe

    lr_mult = 0.4 if plan.endswith("discriminative rates") else default_lr_mult("segmentation")
    phases = rt.preset("head_only" if plan == "frozen encoder" else "two_phase", epochs=EPOCHS, lr_mult=lr_mult)
    if plan == "frozen encoder":  # as the default's decoder phase: the frozen encoder's BatchNorm adapts
        phases = [p.model_copy(update={"train_bn": True}) for p in phases]
    recipe = SegmentationRecipe(backbone="resnet18", weights=None if plan.startswith("from scratch") else str(WEIGHTS),
                                image_size=size, batch_size=16, class_names=["background", "polyp"],
                                augmentation="segmentation", phases=phases, early_stopping_patience=None,
                                cache_features=False, val_fraction=0, seed=seed, precision=precision)
    if holdout:  # an ablation's split: train on part of train, score on the rest (val untouched)
        splits = SegmentationRecipe(class_names=["background", "polyp"], seed=0).splits(
            str(DATA / "train"), val_fraction=holdout, with_test=False)
    else:
        splits = recipe.splits(str(DATA), val_fraction=0)
    started = time.perf_counter()
    recipe.fit(splits.train, validation_data=None, verbose=2)
    seconds = time.perf_counter() - started
    figures = recipe.evaluate(splits.val, bootstrap=0)
    result = {"plan": plan, "lr_mult": phases[-1].lr_mult, "seed": seed, "size": size, "seconds": round(seconds, 1),
              "train_images_per_s": round(EPOCHS * len(splits.train) / seconds, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "dice": figures["dice"], "dataset_dice": figures["dataset_dice"], "iou": figures["iou"],
              "per_image_dice": figures["per_image_dice"], "threads": threads,
              "precision": precision,  # as main resolved it ("auto" never reaches here)
              "scored_on": f"train holdout {holdout:g} (split seed 0)" if holdout else "val"}
    if plan == "default" and seed == 0 and not holdout:
        # a failed export must not lose the run's figures (one run is over an hour on 2 cores)
        try:
            result.update(serving_throughput(recipe, splits.val, out_dir / f"export_{size}"))
        except Exception as error:  # noqa: BLE001 -- recorded with the run, not hidden
            result["serving_error"] = f"{type(error).__name__}: {str(error)[-500:]}"
    return result


def serving_throughput(recipe, val, export_root: Path) -> dict:
    import shutil

    import tensorflow as tf

    shutil.rmtree(export_root, ignore_errors=True)
    export_dir = recipe.export(export_root, warmup_images=val.paths[:4])
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    encoded = [Path(p).read_bytes() for p in val.paths]
    serve(image_bytes=tf.constant(encoded[:16]))  # warm
    started = time.perf_counter()
    for start in range(0, len(encoded), 16):
        serve(image_bytes=tf.constant(encoded[start:start + 16]))
    return {"serving_images_per_s": round(len(encoded) / (time.perf_counter() - started), 1)}


def _runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def label(run: dict) -> str:
    """A plan's name, with its precision where that is not float32 (runs before the field: float32)."""
    precision = run.get("precision", "float32")
    return run["plan"] if precision == "float32" else f"{run['plan']} [{precision}]"


def _margin(runs: list[dict], plan: str, other: str, size: int):
    seeds = sorted({r["seed"] for r in runs if label(r) == plan and r["size"] == size}
                   & {r["seed"] for r in runs if label(r) == other and r["size"] == size})
    if not seeds:
        return None
    by = {(label(r), r["seed"]): r for r in runs if r["size"] == size}
    per_seed = [by[plan, s]["dice"] - by[other, s]["dice"] for s in seeds]
    images = len(by[plan, seeds[0]]["per_image_dice"])
    per_image = [statistics.mean((by[plan, s]["per_image_dice"][i] or 0.0) - (by[other, s]["per_image_dice"][i] or 0.0)
                                 for s in seeds) for i in range(images)]
    seed_term = statistics.stdev(per_seed) / math.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
    image_term = statistics.stdev(per_image) / math.sqrt(images)
    return statistics.mean(per_seed), math.hypot(seed_term, image_term), len(seeds)


def report(runs: list[dict], size: int) -> str:
    sized = [r for r in runs if r["size"] == size]
    scored_on = sized[0].get("scored_on", "val") if sized else "val"
    images = len(sized[0]["per_image_dice"]) if sized else 0
    lines = [f"**{size} px, scored on {scored_on} ({images} images), 12 epochs; mean ± sd over seeds**", "",
             "| plan | seeds | per-image Dice | dataset Dice | IoU | s / run | train img/s | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    labels = list(dict.fromkeys(label(r) for r in sorted(runs, key=lambda r: PLANS.index(r["plan"])) if r["size"] == size))
    for plan in labels:
        mine = [r for r in runs if label(r) == plan and r["size"] == size]
        sd = lambda key: statistics.stdev([r[key] for r in mine]) if len(mine) > 1 else 0.0
        mean = lambda key: statistics.mean(r[key] for r in mine)
        lines.append(f"| {plan} | {len(mine)} | {mean('dice'):.3f} ± {sd('dice'):.3f} | "
                     f"{mean('dataset_dice'):.3f} ± {sd('dataset_dice'):.3f} | {mean('iou'):.3f} | "
                     f"{mean('seconds'):.0f} | {mean('train_images_per_s'):.1f} | {max(r['peak_rss_gb'] for r in mine):.2f} |")
    lines.append("")
    pairs = [("default", other) for other in PLANS[1:]] + [("from scratch", "from scratch, discriminative rates")]
    pairs += [(plan, "default") for plan in labels
                                                            if plan.startswith("default [")]
    for plan, other in pairs:
        margin = _margin(runs, plan, other, size)
        if margin:
            difference, se, seeds = margin
            lines.append(f"- {plan} − {other}: {difference:+.3f} per-image Dice, SE {se:.3f} "
                         f"({difference / se:.1f} SE, {seeds} seeds)")
    # the newest export measured (runs are appended): the default of today, not of an earlier plan
    serving = [r for r in runs if r["size"] == size and "serving_images_per_s" in r]
    if serving:
        lines.append(f"- exported SavedModel ({label(serving[-1])}, seed {serving[-1]['seed']}), serving_default from "
                     f"JPEG bytes (batches of 16): {serving[-1]['serving_images_per_s']} images/s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plans", nargs="+", default=list(PLANS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="float32", help="the recipes' precision (auto: what restransfer "
                        "chooses on this machine); runs of each precision are kept apart")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="for ablations: train on 1-F of train, score on the other F of it (runs_holdout.jsonl)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("PLAN", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / ("runs_holdout.jsonl" if args.holdout else "runs.jsonl")
    if args.one:
        result = run_one(args.one[0], int(args.one[1]), args.size, args.threads, OUT, args.precision, args.holdout)
        print("RESULT " + json.dumps(result))
        return 0
    if not args.report_only:
        wanted = args.precision
        if wanted == "auto":
            from restransfer.devices import auto_precision

            wanted = auto_precision()
        done = {(r["plan"], r["seed"], r["size"], r.get("precision", "float32")) for r in _runs(log)}
        todo = [(plan, seed) for seed in args.seeds for plan in args.plans
                if (plan, seed, args.size, wanted) not in done]

        def launch(job):
            plan, seed = job
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            process = subprocess.run([sys.executable, __file__, "--one", plan, str(seed), "--size", str(args.size),
                                      "--threads", str(args.threads), "--precision", wanted,
                                      "--holdout", str(args.holdout)],
                                     capture_output=True, text=True, env=env)
            lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
            if process.returncode or not lines:
                print(f"{plan} seed {seed} failed:\n{process.stderr[-3000:]}", file=sys.stderr)
                return None
            result = json.loads(lines[-1][7:])
            with open(log, "a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(f"{plan} seed {seed}: Dice {result['dice']:.3f} ({result['seconds']:.0f} s)", flush=True)
            return result

        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(launch, todo))
    print(report(_runs(log), args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
