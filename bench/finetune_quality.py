"""Fine-tuning quality: restransfer's default plan against the usual alternatives (issue 17).

    .venv/bin/python bench/finetune_quality.py                 # the whole benchmark
    .venv/bin/python bench/finetune_quality.py --report-only   # the tables from runs.jsonl

Backbone: ResNet-18 with the stand-in weights in ../shared/weights (Tiny-ImageNet, 8 epochs,
44.8 % top-1 there; NOT ImageNet weights). Every plan of a budget gets the same number of
epochs, batch 32, no early stopping and no validation during training: each run is scored
once, at the end, on its held-out images.

Data (../shared/data), 64 px (the stand-in's source resolution):
  * hymenoptera: the official train (245) / val (153) split; seeds 0..S-1.
  * cifar10_small: train (1,000, 100 a class) / val (2,000); seeds 0..S-1.
  * brain_mri: stratified 5-fold CV (253 images), one run per fold with seed = fold index,
    so every image is scored once per plan: the replicates are the folds.

Two tiers, run in this order (the whole matrix: ~3.3 hours on 2 cores with oneDNN, estimated
from the measured per-run times and printed with the report -- not the hour issue 17 asks for,
and the report's lower bound, the full-network epochs alone, is 1.5 hours):
  * the comparison the default must win -- default, keras_guide, from scratch, linear probe
    -- at two budgets (6 and 12 epochs);
  * the candidates that could change the default -- gradual unfreezing, the head phase with
    BatchNorm frozen (the default before these runs), EMA, label smoothing, MixUp, a longer
    head phase, other lr_mult -- at 12 epochs, each an ablation of the default (one change).
The linear probe trains on cached backbone features of the un-augmented images (restransfer's
feature cache), so it costs one forward pass.

Runs go two at a time, one process and one thread each (--workers, --threads): much of a
short run is single-threaded Python (tracing each phase's step), so two one-thread runs
use both cores where one two-thread run would leave one idle.

Every run is appended to ``bench/finetune_quality/runs.jsonl`` (per-image correctness kept),
and runs already there are skipped: an interrupted benchmark continues where it stopped.
``bench/finetune_quality/previous_default/`` keeps every run made while the default's head
phase froze BatchNorm, under the names of that time ("default (two_phase)" = BN frozen; the
ablations built on it); ``--out`` that folder ``--report-only`` gives its report.
Margins: the mean accuracy difference between two plans over the seeds (folds), with a
standard error that counts both sources of noise: the seeds (sd of the per-seed differences
/ sqrt(seeds)) and the finite set of held-out images (sd over images of the per-image
difference in correctness, averaged over seeds, / sqrt(images)), combined in quadrature.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "resnet18_standin.pth"
OUT = REPO / "bench" / "finetune_quality"
DATASETS = ("hymenoptera", "cifar10_small", "brain_mri")
DEFAULT = "default (two_phase)"
RIVALS = ("keras_guide", "from scratch", "linear probe")
COMPARISON = (DEFAULT, *RIVALS)
FROZEN_BN = "two_phase, BN frozen in the head phase"  # the default until issue 17's runs
ABLATIONS = ("gradual", FROZEN_BN, "two_phase + EMA", "two_phase + label smoothing 0.1",
             "two_phase + MixUp 0.2", "two_phase, head for half the budget", "two_phase, lr_mult 0.6",
             "two_phase, lr_mult 0.2")


def plan(name: str, epochs: int) -> dict:
    """Phases and recipe options of a plan at a total budget of ``epochs``."""
    from restransfer.training.phases import Phase, default_phases, preset

    base = dict(weights=str(WEIGHTS), augmentation="light", cache_features=False)
    two_phase = default_phases(epochs // 2) if epochs % 2 == 0 else preset("two_phase", epochs)
    with_full = lambda **change: [p.model_copy(update=change) if p.trainable != "head" else p for p in two_phase]
    if name == DEFAULT:
        return dict(base, phases=two_phase)
    if name == "keras_guide":
        return dict(base, phases=preset("keras_guide", epochs))
    if name == "from scratch":
        return dict(base, weights=None, phases=[Phase("all", epochs=epochs, lr=2e-3, schedule="one_cycle")])
    if name == "linear probe":
        return dict(base, augmentation="none", cache_features=True, phases=preset("head_only", epochs))
    if name == "gradual":
        return dict(base, phases=preset("gradual", epochs))
    if name == FROZEN_BN:
        return dict(base, phases=[p.model_copy(update={"train_bn": False}) for p in two_phase])
    if name == "two_phase + EMA":
        return dict(base, phases=with_full(ema=True))
    if name == "two_phase + label smoothing 0.1":
        return dict(base, phases=[p.model_copy(update={"label_smoothing": 0.1}) for p in two_phase])
    if name == "two_phase + MixUp 0.2":
        return dict(base, phases=with_full(mixup=0.2))
    if name == "two_phase, head for half the budget":
        head, full = two_phase
        return dict(base, phases=[head.model_copy(update={"epochs": epochs // 2}),
                                  full.model_copy(update={"epochs": epochs - epochs // 2})])
    if name.startswith("two_phase, lr_mult "):
        return dict(base, phases=with_full(lr_mult=float(name.rsplit(" ", 1)[1])))
    raise ValueError(f"unknown plan {name!r}")


def matrix_tiers(budgets, ablation_budget: int) -> list[list[tuple[str, int]]]:
    """The (plan, epochs) cells of the matrix in the order they run: the comparison at each
    budget, then the ablations."""
    tiers = [[(name, epochs) for name in COMPARISON] for epochs in budgets]
    return tiers + [[(name, ablation_budget) for name in ABLATIONS]]


def matrix_cells(budgets, ablation_budget: int) -> list[tuple[str, int]]:
    return [cell for tier in matrix_tiers(budgets, ablation_budget) for cell in tier]


def replicates(dataset: str, seeds: int, folds: int):
    """(replicate id, seed, train, held-out) for a dataset."""
    from restransfer import data

    if dataset == "brain_mri":
        everything = data.image_folder(SHARED / "data" / "brain_mri", progress=False)
        for fold, (train, held_out) in enumerate(data.kfold(everything, n_splits=folds, seed=0)):
            yield f"fold {fold}", fold, train, held_out
        return
    root = SHARED / "data" / dataset
    train = data.image_folder(root, split="train", progress=False)
    held_out = data.image_folder(root, split="val", class_names=train.class_names, progress=False)
    for seed in range(seeds):
        yield f"seed {seed}", seed, train, held_out


def replicate_names(dataset: str, seeds: int, folds: int) -> list[str]:
    return [f"fold {k}" for k in range(folds)] if dataset == "brain_mri" else [f"seed {k}" for k in range(seeds)]


def _worker_start(threads: int):
    """Each worker process trains with ``threads`` threads: two one-thread workers keep both
    cores busy through the single-threaded parts (tracing, Python) as well."""
    import restransfer  # noqa: F401  (first: it turns TensorFlow's oneDNN CPU kernels on)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@functools.lru_cache(maxsize=None)
def _replicates(dataset: str, seeds: int, folds: int):
    return list(replicates(dataset, seeds, folds))


def run_task(task, seeds: int, folds: int, size: int, precision: str = "float32") -> dict:
    dataset, index, name, epochs = task
    replicate, seed, train, held_out = _replicates(dataset, seeds, folds)[index]
    return dict(dataset=dataset, plan=name, epochs=epochs, replicate=replicate, seed=seed, size=size,
                **run_once(name, epochs, seed, train, held_out, size, precision))


def run_once(name: str, epochs: int, seed: int, train, held_out, size: int, precision: str = "float32") -> dict:
    import keras
    from sklearn.metrics import roc_auc_score

    from tensorflow.python.util import _pywrap_util_port

    import restransfer as rt

    keras.backend.clear_session()
    recipe = rt.ClassificationRecipe(
        backbone="resnet18", class_names=train.class_names, image_size=size, batch_size=32,
        early_stopping_patience=None, val_fraction=0, seed=seed, precision=precision, **plan(name, epochs))
    started = time.perf_counter()
    recipe.fit(train, verbose=0)
    probabilities = recipe.predict_dataset(held_out)
    seconds = time.perf_counter() - started
    correct = (probabilities.argmax(axis=1) == held_out.labels)
    auc = float(roc_auc_score(held_out.labels, probabilities[:, 1])) if held_out.num_classes == 2 else None
    return dict(accuracy=float(correct.mean()), auc=auc, seconds=seconds, onednn=_pywrap_util_port.IsMklEnabled(),
                precision=keras.mixed_precision.global_policy().name,
                correct=correct.astype(int).tolist(), paths=[Path(p).name for p in held_out.paths])


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(run) -> tuple:
    return run["dataset"], run["plan"], run["epochs"], run["replicate"]


# ---- statistics -----------------------------------------------------------------------------

def mean_sd(values):
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "–"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def per_image(runs) -> dict:
    """Mean correctness of each held-out image over a plan's replicates (brain: its fold's run)."""
    totals: dict[str, list] = {}
    for run in runs:
        for name, hit in zip(run["paths"], run["correct"]):
            totals.setdefault(f"{run['replicate'] if run['dataset'] == 'brain_mri' else ''}/{name}", []).append(hit)
    return {k: statistics.mean(v) for k, v in totals.items()}


def difference(ours: list[dict], theirs: list[dict]):
    """(mean accuracy difference, its standard error) between two plans' replicates."""
    by_replicate = {r["replicate"]: r for r in theirs}
    pairs = [(r, by_replicate[r["replicate"]]) for r in ours if r["replicate"] in by_replicate]
    if not pairs:
        return None
    brain = pairs[0][0]["dataset"] == "brain_mri"
    a, b = per_image([p[0] for p in pairs]), per_image([p[1] for p in pairs])
    diffs = [a[k] - b[k] for k in a]
    margin = statistics.mean(diffs)  # equals the mean over replicates of the accuracy differences
    se_images = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if brain:  # each image is scored once: the image term is the whole sampling error
        return margin, se_images
    seed_diffs = [x["accuracy"] - y["accuracy"] for x, y in pairs]
    se_seeds = statistics.stdev(seed_diffs) / math.sqrt(len(seed_diffs)) if len(seed_diffs) > 1 else 0.0
    return margin, math.sqrt(se_images ** 2 + se_seeds ** 2)


ONEDNN_SPEEDUP = 2.5  # measured: the same ants/bees run took 193 s without oneDNN, 78 s with it


def judge(margin: float, se: float) -> tuple[float, str]:
    """margin / SE and the verdict: a plan wins when it is more than 2 SE ahead."""
    ratio = margin / se if se > 0 else float("inf")
    return ratio, "default wins (> 2 SE)" if ratio > 2 else ("plan wins (> 2 SE)" if ratio < -2 else "within 2 SE")


def onednn_seconds(group: list[dict]) -> float | None:
    """Mean seconds of a cell's runs made with oneDNN on; None when it has none."""
    fast = [r["seconds"] for r in group if r.get("onednn")]
    return statistics.mean(fast) if fast else None


def matrix_cost(runs: list[dict], seeds: int = 3, folds: int = 5, budgets=(12, 6), ablation_budget: int = 12,
                workers: int = 2) -> float:
    """Estimated wall seconds of the whole matrix on ``workers`` cores with oneDNN: each cell's
    mean oneDNN run time (a cell without such runs: its runs before oneDNN / 2.5, the ratio
    measured on the same run; an ablation without runs: the default's time at that budget)."""
    def seconds(dataset, name, epochs):
        group = [r for r in runs if (r["dataset"], r["plan"], r["epochs"]) == (dataset, name, epochs)]
        fast = onednn_seconds(group)
        if fast is not None:
            return fast
        if group:
            return statistics.mean(r["seconds"] for r in group) / ONEDNN_SPEEDUP
        return seconds(dataset, DEFAULT, epochs) if name != DEFAULT else 0.0

    total = 0.0
    for dataset in DATASETS:
        replicas = folds if dataset == "brain_mri" else seeds
        total += replicas * sum(seconds(dataset, name, epochs) for name, epochs in matrix_cells(budgets, ablation_budget))
    return total / workers


# bench/cpu_training.py: a ResNet-18 training step at 64 px, batch 32, one thread, oneDNN on
TRAIN_IMAGES_PER_SECOND_PER_CORE = 46.7


def full_network_floor(seeds: int = 3, folds: int = 5, budgets=(12, 6), ablation_budget: int = 12,
                       cores: int = 2) -> tuple[int, float]:
    """A lower bound on the matrix's wall time: the images that pass forward and backward
    through a fully trainable network (phases with ``trainable="all"``), at the measured
    training speed on every core, with nothing else counted (head phases, scoring, tracing,
    two runs sharing the memory bus). Returns (images, seconds)."""
    images = 0
    for dataset in DATASETS:
        replicas = _replicates(dataset, seeds, folds)
        for name, epochs in matrix_cells(budgets, ablation_budget):
            full_epochs = sum(p.epochs for p in plan(name, epochs)["phases"] if p.trainable == "all")
            images += full_epochs * sum(len(train) for _, _, train, _ in replicas)
    return images, images / (TRAIN_IMAGES_PER_SECOND_PER_CORE * cores)


def report(runs: list[dict], wall_seconds: float | None) -> str:
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in runs)]
    grouped: dict[tuple, list] = {}
    for run in runs:
        grouped.setdefault((run["dataset"], run["plan"], run["epochs"]), []).append(run)
    lines = ["| dataset | budget | plan | accuracy | AUC | replicates | s / run |", "|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        for epochs in sorted({r["epochs"] for r in runs}):
            for name in (*COMPARISON, *ABLATIONS):
                group = grouped.get((dataset, name, epochs))
                if not group:
                    continue
                aucs = [r["auc"] for r in group if r["auc"] is not None]
                fast = onednn_seconds(group)
                seconds = f"{fast:.0f}" if fast is not None else \
                    f"{statistics.mean(r['seconds'] for r in group):.0f} (before oneDNN)"
                lines.append(f"| {dataset} | {epochs} | {name} | {mean_sd([r['accuracy'] for r in group])} | "
                             f"{mean_sd(aucs) if dataset == 'brain_mri' else '–'} | {len(group)} | {seconds} |")
    lines += ["", "Margins of the default (accuracy; SE of the difference as in the module docstring; "
              "\"wins\" when the margin exceeds 2 SE):", "",
              "| dataset | budget | default − plan | margin | SE | margin / SE | verdict |", "|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        for epochs in sorted({r["epochs"] for r in runs}):
            ours = grouped.get((dataset, DEFAULT, epochs))
            if not ours:
                continue
            for name in (*RIVALS, *ABLATIONS):
                theirs = grouped.get((dataset, name, epochs))
                result = difference(ours, theirs) if theirs else None
                if result is None:
                    continue
                margin, se = result
                ratio, verdict = judge(margin, se)
                lines.append(f"| {dataset} | {epochs} | {name} | {margin:+.3f} | {se:.3f} | {ratio:+.1f} | {verdict} |")
    aucs = [(dataset, epochs, name) for dataset in datasets if dataset == "brain_mri"
            for epochs in sorted({r["epochs"] for r in runs}) for name in (*RIVALS, *ABLATIONS)
            if grouped.get((dataset, DEFAULT, epochs)) and grouped.get((dataset, name, epochs))]
    if aucs:
        lines += ["", "brain MRI, AUC (threshold-free; accuracy there is close to the majority class's share "
                  "for most plans): margin = mean over folds of the paired AUC difference, SE = its sd / "
                  "sqrt(folds):", "", "| budget | default − plan | AUC margin | SE | margin / SE | verdict |",
                  "|---|---|---|---|---|---|"]
        for dataset, epochs, name in aucs:
            theirs = {r["replicate"]: r["auc"] for r in grouped[dataset, name, epochs]}
            diffs = [r["auc"] - theirs[r["replicate"]] for r in grouped[dataset, DEFAULT, epochs] if r["replicate"] in theirs]
            if len(diffs) < 2:
                continue
            margin, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            ratio, verdict = judge(margin, se)
            lines.append(f"| {epochs} | {name} | {margin:+.3f} | {se:.3f} | {ratio:+.1f} | {verdict} |")
    total = sum(r["seconds"] for r in runs)
    lines += ["", f"The whole matrix (4 plans x budgets 12 and 6, 8 ablations at 12; 3 seeds, 5 folds), "
              f"estimated from these runs' times with oneDNN, two runs at a time: "
              f"{matrix_cost(runs) / 3600:.1f} hours."]
    images, floor = full_network_floor()
    lines += ["", f"Lower bound on 2 cores: its full-network phases alone pass {images:,} images forward and "
              f"backward, {floor / 3600:.1f} hours at {TRAIN_IMAGES_PER_SECOND_PER_CORE} images/s a core "
              f"(bench/cpu_training.py), before head phases, scoring and tracing."]
    before = sum(1 for r in runs if not r.get("onednn"))
    lines += ["", f"{len(runs)} runs ({before} of them before restransfer turned TensorFlow's oneDNN CPU "
              f"kernels on, {ONEDNN_SPEEDUP}x slower; same plans and seeds); training + scoring time summed over runs: "
              f"{total / 60:.1f} min" + (f"; wall time of this invocation: {wall_seconds / 60:.1f} min" if wall_seconds else "") + "."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[12, 6])
    parser.add_argument("--ablation-budget", type=int, default=12)
    parser.add_argument("--plans", nargs="+", default=None, help="only these plans (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (processes)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads per worker")
    parser.add_argument("--precision", default="float32", help="the recipes' precision (runs.jsonl before "
                        "this option: float32); give each precision its own --out")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not WEIGHTS.exists():
        sys.exit(f"needs the stand-in weights: {WEIGHTS}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    runs = load_runs(log)
    started = time.perf_counter()
    if not args.report_only:
        done = {key(r) for r in runs}
        # the comparison first, one budget at a time (in the order given), then the ablations
        tasks = []
        for cells in matrix_tiers(args.budgets, args.ablation_budget):
            for dataset in args.datasets:
                for index, replicate in enumerate(replicate_names(dataset, args.seeds, args.folds)):
                    tasks += [(dataset, index, name, epochs) for name, epochs in cells
                              if (not args.plans or name in args.plans) and (dataset, name, epochs, replicate) not in done]
        print(f"{len(tasks)} runs to do, {args.workers} at a time", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_worker_start,
                                 initargs=(args.threads,)) as pool:
            futures = [pool.submit(run_task, task, args.seeds, args.folds, args.size, args.precision) for task in tasks]
            for future in as_completed(futures):
                run = future.result()
                runs.append(run)
                with log.open("a") as handle:  # one writer: this process
                    handle.write(json.dumps(run) + "\n")
                print(f"{run['dataset']} | {run['epochs']} epochs | {run['plan']} | {run['replicate']}: "
                      f"accuracy {run['accuracy']:.3f} ({run['seconds']:.0f} s; "
                      f"{(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
    text = report(runs, None if args.report_only else time.perf_counter() - started)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
