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

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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
    from restransfer import data as data_lib
    from restransfer.tasks.classification import ClassificationRecipe
    from restransfer.training.phases import Phase

    out = Path(args.out)
    phases = [Phase("head", epochs=args.epochs, lr=1e-3), Phase("all", epochs=args.epochs, lr=3e-4)]
    if args.data is None:
        source, channels, image_size = "sklearn:digits", 1, args.image_size or 32
    else:
        source, channels, image_size = str(Path(args.data)), 3, args.image_size or 96
    # digits have no parts of their own: 20 % test, then 20 % of the rest for validation
    splits = data_lib.resolve_splits(source, val_fraction=0.2, test_fraction=0.2 if args.data is None else 0,
                                     seed=args.seed, channels=channels)
    train, val, test = splits.train, splits.val, splits.test
    recipe = ClassificationRecipe(
        backbone=args.backbone, weights=args.weights, class_names=train.class_names,
        image_size=image_size, channels=channels, phases=phases, batch_size=args.batch_size,
        augmentation="none" if args.data is None else "light", seed=args.seed,
    )
    print(f"fine-tuning {args.backbone} (weights: {args.weights or 'random init'}) on {source}: "
          f"{len(train)} train / {len(val) if val is not None else 0} val images, {image_size}px")
    recipe.fit(train, validation_data=val)
    from restransfer.cli.runs import report_run

    held_out = test if test is not None else val
    roles = {"val_*": "validation split: early stopping kept its best epoch on it, so its figures are optimistic",
             **({"test_*": "test split: nothing was tuned on it"} if test is not None else {})}
    out.mkdir(parents=True, exist_ok=True)
    report_run(recipe, out, "restransfer quickstart", splits, roles)
    metrics = recipe.evaluate(held_out)
    print(f"held-out accuracy: {metrics['accuracy']:.3f} ({len(held_out)} images, "
          f"{'test' if test is not None else 'validation'} split)")
    model_path = recipe.save(out / "model.keras")
    export_dir = recipe.export(out / "export", model_name="restransfer", warmup_images=held_out)
    (out / "metrics.json").write_text(json.dumps(
        {"test" if test is not None else "val": metrics, "source": source, "splits": roles}, indent=2))
    print(f"model:  {model_path}\nreport: {out / 'report.html'}\nexport: {export_dir}  "
          f"(TensorFlow Serving: --model_base_path={export_dir.parent.resolve()})")
    return EXIT_OK


def _load_recipe(path, unsafe: bool):
    """A .keras model file, or a run directory (its model.keras)."""
    from restransfer.tasks.classification import ClassificationRecipe

    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path} (give a .keras file or a run directory)")
    return ClassificationRecipe.load(path, safe_mode=not unsafe)


def cmd_validate(args) -> int:
    from restransfer.cli.config import RecipeError, load_recipe

    failed = 0
    report = []
    for path in args.recipes:
        try:
            load_recipe(path, args.set)
            report.append({"recipe": path, "ok": True, "errors": []})
            if not args.json:
                print(f"{path}: ok")
        except RecipeError as error:
            failed += 1
            report.append({"recipe": path, "ok": False, "errors": error.problems})
            if not args.json:
                print("\n".join(error.problems), file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return EXIT_USAGE if failed else EXIT_OK


def cmd_train(args) -> int:
    from restransfer.cli.config import load_recipe

    load_recipe(args.recipe, args.set)  # bad recipes fail here, before TensorFlow loads
    _quiet_tensorflow()
    from restransfer.cli import runs

    run_dir = runs.train(args.recipe, args.set, overwrite=args.overwrite, resume=args.resume,
                         verbose="lines" if args.quiet_progress else args.progress)
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
    _quiet_tensorflow()
    recipe = _load_recipe(args.model, args.unsafe)
    results = []
    for path in args.images:
        probabilities = recipe.predict([path])
        decided = recipe.decide(probabilities)[0]
        probabilities = probabilities[0]
        order = probabilities.argsort()[::-1][: args.top_k]
        results.append({"image": path, "decision": decided, "top": [
            {"class": recipe.class_names[i], "probability": float(probabilities[i])} for i in order],
            "probabilities": {name: float(p) for name, p in zip(recipe.class_names, probabilities)}})
    rule = recipe.decision.describe()
    if args.json:
        print(json.dumps({"decision_rule": rule, "results": results}, indent=2))
    else:
        print(f"decision: {rule}")
        for item in results:
            best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in item["top"])
            decided = item["decision"] if isinstance(item["decision"], str) else ",".join(item["decision"]) or "-"
            print(f"{item['image']}: {decided}  ({best})")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    _quiet_tensorflow()
    recipe = _load_recipe(args.model, args.unsafe)
    metrics = recipe.evaluate(args.data)
    print(json.dumps(metrics, indent=2) if args.json else
          "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    return EXIT_OK


def cmd_export(args) -> int:
    _quiet_tensorflow()
    recipe = _load_recipe(args.model, args.unsafe)
    directory = recipe.export(args.out, model_name=args.name, version=args.version, top_k=args.top_k,
                              warmup_images=args.warmup or None)
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

    for name, func, text in (("predict", cmd_predict, "class probabilities for image files"),
                             ("evaluate", cmd_evaluate, "metrics on a labelled image folder"),
                             ("export", cmd_export, "SavedModel for TensorFlow Serving")):
        p = commands.add_parser(name, help=text)
        p.add_argument("model", help="a .keras file written by restransfer, or a run directory")
        p.add_argument("--unsafe", action="store_true",
                       help="allow code in the model file (Keras safe_mode off); only for files you trust")
        p.set_defaults(func=func)
        if name == "predict":
            p.add_argument("images", nargs="+")
            p.add_argument("--top-k", type=int, default=3)
            p.add_argument("--json", action="store_true")
        elif name == "evaluate":
            p.add_argument("--data", required=True)
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--out", required=True)
            p.add_argument("--name", default="restransfer", help="model name (TF Serving --model_name)")
            p.add_argument("--version", type=int, default=None)
            p.add_argument("--top-k", type=int, default=5)
            p.add_argument("--warmup", nargs="*", default=[], help="a few real images for warmup requests")
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
