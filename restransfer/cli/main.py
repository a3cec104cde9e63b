"""The ``restransfer`` command line.

TensorFlow is imported inside the commands that need it, never at module level, so that
``--help`` answers at once. Exit codes: 0 ok, 2 bad usage or input, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _quiet_tensorflow() -> None:
    """Loads TensorFlow without its start-up noise (C++ and absl lines about CUDA stubs,
    cuInit, CPU features), unless ``RESTRANSFER_DEBUG=1`` or TF_CPP_MIN_LOG_LEVEL asks for
    TensorFlow's info/warnings (0 or 1). Python warnings are still shown.

    absl writes its lines from before its own initialisation straight to file descriptor 2,
    whatever TF_CPP_MIN_LOG_LEVEL says, so fd 2 points at /dev/null while TensorFlow loads
    and finds its devices."""
    if os.environ.get("RESTRANSFER_DEBUG") == "1" or os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"):
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel("ERROR")  # e.g. tf.function retracing notices


def cmd_backbones(args) -> int:
    from restransfer.models.presets import describe_backbones

    rows = describe_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'name':<12} {'block':<10} {'blocks':<9} {'features':>8} {'params':>7}  weights presets "
          "(top-1 %; * = 'imagenet'; + = cached, loads offline)")
    for row in rows:
        presets = ", ".join(f"{'*' if p['name'] == row['imagenet'] else ''}{p['name']} {p['top1']:g}"
                            f"{'+' if p['cached'] else ''}" for p in row["presets"])
        print(f"{row['name']:<12} {row['block']:<10} {row['blocks_per_stage']:<9} "
              f"{row['feature_dim']:>8} {row['params'] / 1e6:>6.1f}M  {presets}")
    print("stages: stem, stage1, stage2, stage3, stage4; `restransfer backbones --json` lists each "
          "preset's source, hash, preprocessing, resolution and licence")
    return EXIT_OK


def cmd_weights_download(args) -> int:
    """Fetches presets into the cache, for machines that will be offline."""
    from restransfer.models import download, presets

    for identifier in args.presets:
        preset = presets.find_preset(identifier)
        path = download.fetch(preset, progress=not args.quiet)
        print(f"{preset.id}: {path}")
    return EXIT_OK


def cmd_weights_import(args) -> int:
    """Registers a weights file brought by hand (checked against the preset's hash)."""
    from restransfer.models import download, presets

    preset = presets.find_preset(args.as_preset) if args.as_preset else None
    preset, path = download.import_file(args.file, preset)
    if not (preset.sha256 or preset.md5):  # only the hub knows its hash: check that it fits
        from restransfer.models.backbones import build_backbone

        build_backbone(preset.backbone, weights=preset.name, input_shape=(64, 64, 3))
    print(f"{args.file}: imported as {preset.id} ({path})")
    return EXIT_OK


def cmd_quickstart(args) -> int:
    """Fine-tune on offline data, evaluate, save and export: the README's main job."""
    _quiet_tensorflow()
    from restransfer.tasks.classification import ClassificationRecipe
    from restransfer.training.phases import Phase

    out = Path(args.out)
    phases = [Phase("head", epochs=args.epochs, lr=1e-3), Phase("all", epochs=args.epochs, lr=3e-4)]
    if args.data is None:
        source, channels, image_size = "sklearn:digits", 1, args.image_size or 32
    else:
        source, channels, image_size = str(Path(args.data)), 3, args.image_size or 96
    recipe = ClassificationRecipe(
        backbone=args.backbone, weights=args.weights, image_size=image_size, channels=channels, phases=phases,
        batch_size=args.batch_size, augmentation="none" if args.data is None else "light", seed=args.seed)
    # digits have no parts of their own: 20 % test, then 20 % of the rest for validation
    splits = recipe.splits(source, val_fraction=0.2, test_fraction=0.2 if args.data is None else 0)
    recipe.skipped = list(splits.skipped)
    train, val, test = splits.train, splits.val, splits.test
    print(f"fine-tuning {args.backbone} (weights: {args.weights or 'random init'}) on {source}: "
          f"{len(train)} train / {len(val) if val is not None else 0} val images, {image_size}px")
    recipe.fit(train, validation_data=val)
    from restransfer.cli.runs import split_roles

    held_out, name = (test, "test") if test is not None else (val, "val")
    roles = split_roles(recipe, tuned_val=True, test=test is not None)
    out.mkdir(parents=True, exist_ok=True)
    figures = recipe.report(out, "restransfer quickstart", splits, roles)
    metrics = {key.removeprefix(f"{name}_"): value for key, value in figures.items() if key.startswith(f"{name}_")}
    print(f"held-out accuracy: {metrics['accuracy']:.3f} ({len(held_out)} images, "
          f"{'test' if test is not None else 'validation'} split)")
    model_path = recipe.save(out / "model.keras")
    export_dir = recipe.export(out / "export", model_name="restransfer", warmup_images=held_out)
    (out / "metrics.json").write_text(json.dumps(
        {name: metrics, "source": source, "splits": roles,
         "skipped_files": [{"path": s.path, "reason": s.reason} for s in recipe.skipped]}, indent=2))
    print(f"model:  {model_path}\nreport: {out / 'report.html'}\nexport: {export_dir}  "
          f"(TensorFlow Serving: --model_base_path={export_dir.parent.resolve()})")
    return EXIT_OK


def _model_file(path) -> Path:
    """A .keras model file, or a run directory's model.keras: checked before TensorFlow loads,
    so a wrong path is said at once."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path} (give a .keras file or a run directory)")
    return path


def _load_recipe(path, unsafe: bool):
    """A .keras model file, or a run directory (its model.keras), as the recipe of its task."""
    model_file = _model_file(path)
    _quiet_tensorflow()
    from restransfer.tasks.base import load

    return load(model_file, safe_mode=not unsafe)


def cmd_validate(args) -> int:
    """The schema, then every check that needs no TensorFlow (:mod:`restransfer.cli.preflight`)."""
    from restransfer.cli.config import RecipeError, load_recipe
    from restransfer.cli.preflight import NOT_CHECKED, data_problems, weights_problems

    failed = 0
    report = []
    for path in args.recipes:
        try:
            config, _ = load_recipe(path, args.set)
            problems = [f"{path}: {p}" for p in data_problems(config) + weights_problems(config)]
        except RecipeError as error:
            problems = error.problems
        failed += bool(problems)
        report.append({"recipe": path, "ok": not problems, "errors": problems})
        if not args.json:
            print("\n".join(problems), file=sys.stderr) if problems else print(f"{path}: ok")
    if args.json:
        print(json.dumps({"recipes": report, "not_checked": NOT_CHECKED}, indent=2))
    else:
        print(NOT_CHECKED)
    return EXIT_USAGE if failed else EXIT_OK


def cmd_train(args) -> int:
    from restransfer.cli.config import RecipeError, load_recipe
    from restransfer.cli.preflight import preflight

    # bad recipes, and every refusal that needs no training, fail here: before TensorFlow
    # loads and before anything is written
    config, _ = load_recipe(args.recipe, args.set)
    problems = preflight(config, overwrite=args.overwrite, resume=args.resume)
    if problems:
        raise RecipeError([f"{args.recipe}: {p}" for p in problems])
    from restransfer.cli import runs

    run_dir = runs.run_directory(config)
    if args.resume and config.training.distribute != "multi_worker" and runs.run_is_complete(config, run_dir):
        # a finished run answers before TensorFlow loads (a multi-worker run's workers decide
        # under their strategy, in runs.train)
        with runs.RunLock(run_dir):
            finished = runs.said_complete(config, run_dir)
        if finished:
            return _train_answer(args, run_dir)
    _quiet_tensorflow()
    from restransfer.training.interrupts import latch_ctrl_c

    try:
        with latch_ctrl_c():
            run_dir = runs.train(args.recipe, args.set, overwrite=args.overwrite, resume=args.resume,
                                 verbose="lines" if args.quiet_progress else args.progress)
    except KeyboardInterrupt:  # Ctrl-C: one line, what was saved and how to go on
        again = " ".join(["restransfer train", args.recipe, *(f"--set {s}" for s in args.set), "--resume"])
        saved = sorted(runs.run_directory(config).glob("**/checkpoints/last.keras"))
        what = (f"{saved[-1].parent} holds the last complete epoch" if saved
                else "no epoch was complete yet")
        print(f"\ninterrupted: {what}; continue with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _train_answer(args, run_dir)


def _train_answer(args, run_dir: Path) -> int:
    if args.json:
        metrics_file = run_dir / "metrics.json"  # absent on a multi-worker run's other workers
        print(json.dumps({"run_dir": str(run_dir),
                          "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None}))
    return EXIT_OK


def cmd_lr_find(args) -> int:
    from restransfer.cli.config import load_recipe

    config, _ = load_recipe(args.recipe, args.set)
    _quiet_tensorflow()
    from restransfer.cli import runs

    recipe = runs.recipe_from_config(config)
    result = recipe.lr_find(runs.load_splits(config, recipe).train, phase=args.phase, steps=args.steps)
    out = Path(args.plot or f"{config.name}_lr_find.png")
    result.plot(out)
    summary = {"phase": args.phase, "steepest": result.steepest, "valley": result.valley, "plot": str(out)}
    print(json.dumps(summary) if args.json else
          f"phase {args.phase}: valley {result.valley:.2e}, steepest {result.steepest:.2e}; plot: {out}")
    return EXIT_OK


def cmd_predict(args) -> int:
    """The model's answer for each file (its task's: classes and probabilities, or a mask and
    an overlay written to --out). Files that cannot be read are reported one line each, in
    plain words; the others are answered; the exit code is 1 when any file failed."""
    recipe = _load_recipe(args.model, args.unsafe)
    from restransfer.data.decoding import check_image

    results, failed = [], []
    for index, path in enumerate(args.images):
        reason = check_image(path, **recipe.decode_options) if os.path.isfile(path) else "no such file"
        if reason:
            failed.append({"image": path, "error": reason})
            print(f"restransfer: {path}: {reason}", file=sys.stderr)
            continue
        results.append(recipe.prediction_record(path, index, top_k=args.top_k, out_dir=args.out))
    if args.json:
        print(json.dumps({"decision_rule": recipe.decision_text(), "results": results, "failed": failed}, indent=2))
    else:
        print(f"decision: {recipe.decision_text()}")
        for record in results:
            print(recipe.record_line(record))
    return EXIT_FAILURE if failed else EXIT_OK


def _overlap_with_training(model_path: str, data) -> dict | None:
    """How much of ``data`` the model was trained or tuned on, from its run's split.csv (by
    file content, so copies count too); None when there is no split file."""
    import csv

    path = Path(model_path)
    split_file = (path if path.is_dir() else path.parent) / "split.csv"
    if not split_file.is_file() or data.paths is None:
        return None
    from restransfer.data.splits import _file_digest

    def digest(file):
        stat = os.stat(file)
        return _file_digest(str(file), stat.st_mtime_ns, stat.st_size)

    parts: dict[str, set] = {}
    with open(split_file, newline="") as handle:
        for row in csv.DictReader(handle):
            if os.path.isfile(row["path"]):
                parts.setdefault(row["split"], set()).add(digest(row["path"]))
    mine = [digest(p) for p in data.paths]
    return {name: sum(d in seen for d in mine) for name, seen in parts.items() if name != "test"} | {"images": len(mine)}


def cmd_evaluate(args) -> int:
    recipe = _load_recipe(args.model, args.unsafe)
    data = recipe._as_data(args.data, split="test")
    overlap = _overlap_with_training(args.model, data)
    if overlap and any(overlap.get(name) for name in ("train", "val")):
        print(f"warning: of the {overlap['images']} images in {args.data}, {overlap.get('train', 0)} were this model's "
              f"training data and {overlap.get('val', 0)} its validation data (its split.csv): these figures are "
              "optimistic; evaluate on images it never saw", file=sys.stderr)
    metrics = recipe.evaluate(data)
    if overlap:
        metrics["overlap_with_run"] = overlap
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(json.dumps(metrics, indent=2) if args.json else "\n".join(f"{k}: {v:.4f}" for k, v in scalars.items()))
    return EXIT_OK


def _run_images(model_path: str, count: int = 4) -> list[str]:
    """A run's first validation (else training) images, from its split.csv: real warm-ups."""
    import csv

    path = Path(model_path)
    split_file = (path if path.is_dir() else path.parent) / "split.csv"
    if not split_file.is_file():
        return []
    with open(split_file, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if os.path.isfile(row["path"])]
    rows.sort(key=lambda row: row["split"] != "val")
    return [row["path"] for row in rows[:count]]


def _run_part(model_path: str, recipe, split: str):
    """A run's ``split`` part (its split.csv rows), read as the recipe reads; None without one."""
    import pandas as pd

    path = Path(model_path)
    split_file = (path if path.is_dir() else path.parent) / "split.csv"
    if not split_file.is_file():
        return None
    frame = pd.read_csv(split_file)
    frame = frame[frame["split"] == split]
    if frame.empty:
        return None
    options = dict(root="/", allow_outside_root=True, class_names=recipe.class_names, channels=recipe.channels,
                   decode_options=recipe.decode_options, keep_precision=bool(recipe.keep_precision), progress=False)
    from restransfer import data as data_lib

    if "mask" in frame.columns:
        return data_lib.from_mask_csv(frame, image_column="path", mask_column="mask", ignore_index=recipe.ignore_index,
                                      mask_values=getattr(recipe, "mask_values", None), **options)
    return data_lib.from_csv(frame, path_column="path", label_column="label",
                             separator="|" if getattr(recipe, "multi_label", False) else None, **options)


def cmd_export(args) -> int:
    recipe = _load_recipe(args.model, args.unsafe)
    if args.format == "saved_model":
        directory = recipe.export(args.out, model_name=args.name, version=args.version, top_k=args.top_k,
                                  warmup_images=args.warmup or _run_images(args.model) or None)
    else:
        heldout = args.data or _run_part(args.model, recipe, "val") or _run_part(args.model, recipe, "test")
        if heldout is None:
            raise ValueError(f"a {args.format} export is checked on held-out labelled images: pass --data FOLDER "
                             "(a run directory provides its validation split)")
        directory = recipe.export(args.out, model_name=args.name, version=args.version, format=args.format,
                                  quantization=args.quantize, heldout=heldout,
                                  representative=_run_part(args.model, recipe, "train") if args.quantize == "int8" else None,
                                  max_metric_drop=args.max_metric_drop, allow_drop=args.allow_drop)
    print(directory)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from restransfer import __version__

    parser = argparse.ArgumentParser(
        prog="restransfer", description="Transfer learning with ResNets on Keras 3 / TensorFlow."
    )
    parser.add_argument("--version", action="version", version=f"restransfer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("backbones", help="list the backbones and their weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backbones)

    p = commands.add_parser("weights", help="pretrained weights: pre-fetch for offline use, or import a file")
    weights = p.add_subparsers(dest="weights_command", required=True)
    q = weights.add_parser("download", help="download presets into the cache (BACKBONE[.PRESET], e.g. "
                                            "resnet50 or resnet50.torchvision_v2)")
    q.add_argument("presets", nargs="+")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_weights_download)
    q = weights.add_parser("import", help="register a weights file you brought by hand")
    q.add_argument("file")
    q.add_argument("--as", dest="as_preset", metavar="BACKBONE.PRESET",
                   help="the preset it is (default: found by its hash)")
    q.set_defaults(func=cmd_weights_import)

    p = commands.add_parser("train", help="train a recipe file into a run directory")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set fine_tune[0].epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in the existing run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="auto: a live bar on a terminal, one line per epoch otherwise (log files)")
    p.add_argument("--quiet-progress", action="store_true", help="the same as --progress lines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("validate", help="check recipe files without running them")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("lr-find", help="learning-rate range test for a recipe's phase")
    p.add_argument("recipe")
    p.add_argument("--phase", type=int, default=0, help="index of the phase in fine_tune")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--plot", default=None, help="where to write the PNG")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lr_find)

    p = commands.add_parser("quickstart", help="fine-tune, evaluate and export on offline data")
    p.add_argument("data", nargs="?", help="image folder (class sub-folders, optional train/val/test); "
                                           "default: scikit-learn's bundled digits")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--weights", default=None, help="a preset ('imagenet', 'torchvision_v1', ...: see "
                                                   "`restransfer backbones`), a .pth/.safetensors/.weights.h5 "
                                                   "file, or omitted for random init")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2, help="epochs per phase")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)

    for name, func, text in (("predict", cmd_predict, "the model's answer for image files (classes, or masks)"),
                             ("evaluate", cmd_evaluate, "figures on labelled images (or image/mask pairs)"),
                             ("export", cmd_export, "for deployment: SavedModel (TF Serving), LiteRT or ONNX")):
        p = commands.add_parser(name, help=text)
        p.add_argument("model", help="a .keras file written by restransfer, or a run directory")
        p.add_argument("--unsafe", action="store_true",
                       help="allow code in the model file (Keras safe_mode off); only for files you trust")
        p.set_defaults(func=func)
        if name == "predict":
            p.add_argument("images", nargs="+")
            p.add_argument("--top-k", type=int, default=3)
            p.add_argument("--out", default="predictions",
                           help="segmentation: where each image's mask and overlay PNGs are written")
            p.add_argument("--json", action="store_true")
        elif name == "evaluate":
            p.add_argument("--data", required=True)
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--out", required=True)
            p.add_argument("--name", default=None,
                           help="model name (TF Serving --model_name); default: the backbone's, as in Python")
            p.add_argument("--version", type=int, default=None)
            p.add_argument("--top-k", type=int, default=5)
            p.add_argument("--warmup", nargs="*", default=[],
                           help="a few real images for warm-up requests (default: a run's first validation images)")
            p.add_argument("--format", choices=["saved_model", "litert", "onnx"], default="saved_model",
                           help="saved_model (TF Serving), litert (phones, embedded) or onnx (ONNX Runtime)")
            p.add_argument("--quantize", choices=["float16", "int8"], default=None, help="LiteRT only")
            p.add_argument("--data", default=None,
                           help="held-out labelled images the portable file is checked on (default: a run's val split)")
            p.add_argument("--max-metric-drop", type=float, default=0.02,
                           help="refuse a quantized file whose held-out figure drops by more")
            p.add_argument("--allow-drop", action="store_true", help="warn instead of refusing a larger drop")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from restransfer.cli.config import RecipeError

    try:
        return args.func(args)
    except RecipeError as error:
        print(str(error), file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"restransfer: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a runtime failure: one line, not a traceback
        if os.environ.get("RESTRANSFER_DEBUG"):
            raise
        print(f"restransfer: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
