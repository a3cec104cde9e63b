"""One training process for the tf.distribute tests (run by tests/training/test_distribute.py).

    python tests/training/distributed_job.py MODE DATA OUT [--worker I --ports P0,P1] [--resume]

MODE: ``single`` (one device), ``mirrored`` (MirroredStrategy over 2 logical CPU devices)
or ``worker`` (one of the MultiWorkerMirroredStrategy workers on 127.0.0.1). Trains a small
ResNet-18 on the image folder DATA (train/ and val/) with checkpoints in OUT/checkpoints,
saves OUT/model_<tag>.keras (the chief only), and writes what the test compares --
history and weights -- to OUT/result_<tag>.json / .npz.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "mirrored", "worker"])
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--ports", default="")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sync-bn", action="store_true")
    args = parser.parse_args()

    if args.mode == "worker":
        hosts = [f"127.0.0.1:{port}" for port in args.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts},
                                              "task": {"type": "worker", "index": args.worker}})
    import numpy as np
    import tensorflow as tf

    if args.mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from restransfer import ClassificationRecipe
    from restransfer import Phase

    replicas = 1 if args.mode == "single" or "," not in args.ports and args.mode == "worker" else 2
    recipe = ClassificationRecipe(
        backbone="resnet18", weights=None, image_size=32, batch_size=16 // replicas,
        head_dropout=0.0, augmentation="none", cache_features=False, early_stopping_patience=None, seed=3,
        phases=[Phase("head", epochs=1, lr=1e-2, schedule="constant"),
                Phase("stage4", epochs=args.epochs - 1, lr=2e-3, schedule="constant")],
        distribute={"single": "none", "mirrored": "mirrored", "worker": "multi_worker"}[args.mode],
        sync_batchnorm="--sync-bn" in sys.argv,
        lr_scaling="none",  # same global batch, same rates: comparable with the single run
    )
    history = recipe.fit(os.path.join(args.data, "train"), os.path.join(args.data, "val"), verbose=2,
                         checkpoint_dir=os.path.join(args.out, "checkpoints"), resume=args.resume)
    tag = f"{args.mode}{args.worker}"
    recipe.save(os.path.join(args.out, f"model_{tag}.keras"))
    with open(os.path.join(args.out, f"result_{tag}.json"), "w") as handle:
        json.dump({"history": history.history, "worker": recipe.worker.index,
                   "is_chief": recipe.worker.is_chief, "replicas": recipe.worker.replicas}, handle)
    np.savez(os.path.join(args.out, f"weights_{tag}.npz"), *recipe.model.get_weights())
    return 0


if __name__ == "__main__":
    sys.exit(main())
