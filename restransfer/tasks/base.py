"""What every recipe shares, whatever its task: the backbone and its stages, the fine-tuning
phases, ``fit`` (seeds, splits, checkpoints and exact resume, the feature cache, tf.distribute),
``lr_find``, the image contract of every door, ``save``/``load`` and the export's plumbing.

A task (:mod:`restransfer.tasks.classification`, :mod:`~restransfer.tasks.medical`,
:mod:`~restransfer.tasks.segmentation`) is a subclass that contributes only what is its own:

* how a source's targets are read, checked and split (:meth:`Recipe.read_source`);
* the head on the backbone (:meth:`Recipe._head_outputs`, with ``backbone_pooling``);
* its :class:`~restransfer.training.objectives.Objective`: targets, loss, metrics and the
  validation figure early stopping follows (:meth:`Recipe.objective`);
* what a prediction and a decision are (``predict``, ``decision``, ``evaluate``);
* what the served model outputs (:meth:`Recipe.export`);
* the run's report and the figures it tunes (:meth:`Recipe.report`, :meth:`Recipe.after_training`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import keras
import numpy as np

from restransfer import data as data_lib
from restransfer.devices import configure_precision
from restransfer.models import stages as stages_lib
from restransfer.models.backbones import build_backbone, get_spec
from restransfer.models.heads import find_head
from restransfer.tasks.registry import default_augmentation, default_lr_mult
from restransfer.training.loop import TrainingHistory, run_phases
from restransfer.training.phases import Phase, default_phases, preset

COMMON_ARGUMENTS = """
    Arguments every recipe takes:
        backbone: one of ``restransfer.list_backbones()`` (``"resnet18"`` .. ``"resnet152v2"``).
        weights: ``"imagenet"`` (the best published weights for the depth), another preset name
            (``restransfer backbones``), a ``.pth``/``.safetensors``/``.weights.h5`` file, or None.
        class_names / num_classes: the classes; found in the training data when omitted.
        image_size: the square side images are resized to (>= 32).
        channels: 1 (gray, ITU-R 601-2 luma of colour files) or 3.
        phases: a list of :class:`restransfer.Phase`, a preset name (with the task's ``lr_mult``), or
            None (the task's default: ``two_phase`` over 6 epochs).
        batch_size: images per step (per replica when distributed).
        augmentation: a preset (``none``, ``light``, ``medium``, ``medical``), a list of
            albumentations transforms, or None (the task's default, see
            :mod:`restransfer.tasks.registry`).
        early_stopping_patience: epochs without a better validation figure before a phase stops
            (the best epoch's weights are kept); None: no early stopping.
        val_fraction: stratified share held out for validation when the data has no validation part.
        bad_images: ``"skip"`` unusable files (each named in ``recipe.skipped``) or ``"strict"``.
        precision: ``"auto"`` (mixed_float16 on a GPU, float32 on a CPU), ``"float32"``,
            ``"mixed_float16"`` or ``"mixed_bfloat16"``.
        deterministic: TensorFlow op determinism (identical weights run to run).
        cache_features / cache_views: train head-only phases on cached backbone features
            (``"auto"``: where exact).
        stem: 1-channel input: ``"replicate"`` gray to RGB, or ``"sum"`` the first conv's kernels.
        decode_options: how DICOM/NIfTI/16-bit files map to 0-255 (``window``, ``normalize``).
        keep_precision: 16-bit files at full precision (``"auto"``: when the training files have any).
        download_data: download TFDS datasets that are not prepared yet.
        distribute: ``"auto"``, ``"none"``, ``"mirrored"`` or ``"multi_worker"`` (tf.distribute).
        lr_scaling: ``"linear"`` (rates x replicas) or ``"none"``.
        sync_batchnorm: BatchNorm statistics over the global batch when distributed.
        seed: every random choice (splits, order, augmentation, initialisation) follows it.
"""


class Recipe:
    """The machinery every task shares (see the module docstring); not used directly."""

    task = "classification"         # its entry in restransfer.tasks.registry
    backbone_pooling: str | None = "avg"  # the backbone's output the head takes

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | os.PathLike | None = "imagenet",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        image_size: int = 224,
        channels: int = 3,
        phases: list[Phase] | str | None = None,
        batch_size: int = 32,
        augmentation=None,
        early_stopping_patience: int | None = 3,
        val_fraction: float = 0.2,
        bad_images: str = "skip",
        precision: str = "auto",
        deterministic: bool = False,
        cache_features="auto",
        cache_views: int = 1,
        stem: str = "replicate",
        decode_options: dict | None = None,
        keep_precision: bool | str = "auto",
        download_data: bool = True,
        distribute: str = "auto",
        lr_scaling: str = "linear",
        sync_batchnorm: bool = False,
        seed: int = 0,
    ):
        from restransfer.training import distribute as distribute_lib

        get_spec(backbone)
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names but num_classes={num_classes}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if distribute not in distribute_lib.STRATEGIES:
            raise ValueError(f"distribute must be one of {', '.join(distribute_lib.STRATEGIES)}, got {distribute!r}")
        if lr_scaling not in distribute_lib.LR_SCALING:
            raise ValueError(f"lr_scaling must be one of {', '.join(distribute_lib.LR_SCALING)}, got {lr_scaling!r}")
        if cache_features not in ("auto", True, False):
            raise ValueError(f"cache_features must be 'auto', True or False, got {cache_features!r}")
        if keep_precision not in ("auto", True, False):
            raise ValueError(f"keep_precision must be 'auto', True or False, got {keep_precision!r}")
        self.backbone_name = backbone.lower()
        self.weights = weights
        self.class_names = list(class_names) if class_names else None
        self.num_classes = num_classes or (len(class_names) if class_names else None)
        self.image_size = int(image_size)
        self.channels = channels
        if isinstance(phases, str):  # a preset by name, with the task's discriminative rates
            phases = preset(phases, lr_mult=default_lr_mult(self.task))
        self.phases = list(phases) if phases is not None else default_phases(lr_mult=default_lr_mult(self.task))
        self.batch_size = batch_size
        self.augmentation = default_augmentation(self.task) if augmentation is None else augmentation
        self.early_stopping_patience = early_stopping_patience
        self.val_fraction = val_fraction
        self.bad_images = bad_images
        self.precision = precision
        self.deterministic = deterministic
        self.cache_features = cache_features
        self.cache_views = cache_views
        self.stem = stem
        self.decode_options = dict(decode_options or {})
        self.download_data = download_data
        self._keep_precision_setting = keep_precision
        self.keep_precision = None  # 16-bit files at full precision: resolved by fit from the data, or loaded
        self.distribute = distribute
        self.lr_scaling = lr_scaling
        self.sync_batchnorm = sync_batchnorm
        self.worker = distribute_lib.Worker()  # this process's place in the cluster, set by fit
        self.seed = seed
        self.model: keras.Model | None = None
        self.skipped: list[data_lib.SkippedFile] = []
        self.history: TrainingHistory | None = None

    # --- the task's part (subclasses) ------------------------------------------------------

    def _head_outputs(self, backbone: keras.Model, inputs):
        """The task's head on ``backbone`` (built with ``backbone_pooling``): the model's outputs."""
        raise NotImplementedError

    def objective(self, train):
        """The task's :class:`~restransfer.training.objectives.Objective` for training on ``train``."""
        raise NotImplementedError

    def read_source(self, source, **options):
        """A source (folder, CSV, arrays, ...) as the task's data (:class:`ImageData`)."""
        return data_lib.as_image_data(source, **options)

    def _check_task(self, train) -> None:
        """Refuses, before any training, what the task cannot do with this data."""

    @classmethod
    def _arguments_saved_in(cls, model, head) -> dict:
        """Constructor arguments a saved model implies about itself (its head, its input)."""
        return {}

    # --- model --------------------------------------------------------------------------

    def build(self) -> keras.Model:
        """Builds backbone + head (done by ``fit`` when the classes are known)."""
        if self.num_classes is None:
            raise ValueError("num_classes (or class_names) is needed to build the model")
        configure_precision(self.precision)
        shape = (self.image_size, self.image_size, self.channels)
        backbone = build_backbone(self.backbone_name, weights=self.weights, input_shape=shape,
                                  stem=self.stem, pooling=self.backbone_pooling)
        inputs = keras.Input(shape=shape, name="image")
        self.model = keras.Model(inputs, self._head_outputs(backbone, inputs), name=f"{self.backbone_name}_{self.task}")
        self.class_names = find_head(self.model).class_names
        return self.model

    def image_contract(self) -> dict:
        """How files become this model's pixels, stored in its head (so in ``model.keras``)."""
        return {"keep_precision": bool(self.keep_precision), "decode_options": self.decode_options}

    def _require_model(self) -> keras.Model:
        if self.model is None:
            raise RuntimeError("the recipe has no model yet: call fit() or build() first")
        return self.model

    def freeze(self, up_to: str = "stage4") -> None:
        """Freezes the stem and the stages up to ``up_to`` (BatchNorm in inference mode)."""
        stages_lib.freeze(self._require_model(), up_to=up_to)

    def unfreeze(self, stages: str = "all") -> None:
        """Makes ``stages`` (``"stage4"``, ``"stage3+"``, ``"all"``) trainable again."""
        stages_lib.unfreeze(self._require_model(), stages)

    # --- data ---------------------------------------------------------------------------

    def read_options(self) -> dict:
        """How this recipe reads a source: the options every door shares."""
        keep = self.keep_precision if self.keep_precision is not None else self._keep_precision_setting
        return dict(policy=self.bad_images, channels=self.channels, decode_options=self.decode_options,
                    download=self.download_data, keep_precision=keep)

    def splits(self, source, validation=None, test=None, *, val_fraction: float | None = None,
               test_fraction: float = 0.0, with_test: bool = True, csv: dict | None = None) -> data_lib.Splits:
        """The train / validation / test parts of ``source``, decided in the one place that
        decides them (:func:`restransfer.data.resolve_splits`), read as this recipe reads."""
        return data_lib.resolve_splits(
            source, validation, test, class_names=self.class_names,
            val_fraction=self.val_fraction if val_fraction is None else val_fraction,
            test_fraction=test_fraction, with_test=with_test, seed=self.seed, read=self.read_source,
            **({"csv": csv} if csv else {}), **self.read_options())

    def _as_data(self, source, split=None):
        data = self.read_source(source, class_names=self.class_names, split=split, **self.read_options())
        self.skipped += [s for s in data.skipped if s not in self.skipped]
        return data

    def _pipeline(self, data, training: bool, start_epoch: int = 0, cache_pixels: bool | None = None):
        """Batches for this process. Several replicas on one machine: batches of
        ``batch_size`` x replicas, which Keras splits. Several workers: training batches of
        ``batch_size`` from this worker's shard of the files, one per replica and step."""
        worker = self.worker
        sharded = training and worker.count > 1
        if is_tf_dataset(data):
            if sharded:  # a user's dataset: shard by data (batches)
                return data.shard(worker.count, worker.index).repeat()
            return data
        return data_lib.make_pipeline(
            data, self.image_size, self.batch_size * (1 if sharded else worker.local_replicas),
            training=training, augmentation=self.augmentation if training else None,
            seed=self.seed, start_epoch=start_epoch,
            shard=(worker.count, worker.index) if sharded else None, cache_pixels=cache_pixels,
        )

    def _train_pipelines(self, train):
        """start_epoch -> training pipeline. A user's tf.data dataset is used as given (one
        pass per epoch); with several workers, each trains on its shard of it."""
        if is_tf_dataset(train):
            if self.worker.count > 1:
                return lambda start_epoch: self._pipeline(train, training=True)
            return train
        return lambda start_epoch: self._pipeline(train, training=True, start_epoch=start_epoch)

    def _training_data(self, train_data, validation_data, verbose="auto"):
        """(train, validation, steps per epoch) for ``fit``: the splits resolved, the classes
        and the image contract taken from the training part, the task's checks run."""
        if is_tf_dataset(train_data):
            import tensorflow as tf

            if self.num_classes is None:
                raise ValueError("with a tf.data.Dataset, pass num_classes or class_names")
            batches = int(train_data.cardinality())
            if batches == tf.data.INFINITE_CARDINALITY:
                raise ValueError("the training dataset is infinite (.repeat()): pass one epoch of "
                                 "batches (restransfer repeats it), e.g. dataset.take(batches_per_epoch)")
            if batches == tf.data.UNKNOWN_CARDINALITY:  # e.g. after filter(): count one pass
                batches = int(train_data.reduce(0, lambda count, _: count + 1))
                print(f"training dataset of unknown length: counted {batches} batches per epoch")
                train_data = train_data.apply(tf.data.experimental.assert_cardinality(batches))
            if batches < self.worker.count:
                raise ValueError(f"the training dataset has {batches} batch(es), fewer than the "
                                 f"{self.worker.count} workers that share it")
            if validation_data is not None and not is_tf_dataset(validation_data):
                validation_data = self._as_data(validation_data, split="val")  # a folder, arrays, ...
                if self.class_names is None:
                    if validation_data.num_classes != self.num_classes:
                        raise ValueError(f"the validation data has {validation_data.num_classes} classes "
                                         f"{validation_data.class_names}, the model {self.num_classes}")
                    self.class_names = validation_data.class_names
            return train_data, validation_data, batches // self.worker.count
        user_val = validation_data if is_tf_dataset(validation_data) else None
        splits = self.splits(train_data, None if user_val is not None else validation_data,
                             val_fraction=0 if user_val is not None else self.val_fraction, with_test=False)
        train = splits.train
        self._say_what_data(splits, verbose)
        self.keep_precision = train.keep_precision
        self.skipped += [s for s in splits.skipped if s not in self.skipped]
        if self.class_names is None:
            self.class_names = train.class_names
            self.num_classes = train.num_classes
        self._adopt_data(train)
        self._check_task(train)
        from restransfer.training.distribute import steps_per_epoch

        return train, user_val if user_val is not None else splits.val, \
            steps_per_epoch(len(train), self.batch_size, self.worker)

    def _say_what_data(self, splits, verbose) -> None:
        """The data summary before training (not in silent mode), and its warnings (always)."""
        from restransfer.data.summary import summarise
        from restransfer.training.progress import SILENT, progress_mode

        if not self.worker.is_chief:
            return
        lines, warnings = summarise(splits)
        if progress_mode(verbose) != SILENT:
            print("data:\n" + "\n".join(lines))
        for warning in warnings:
            print(f"warning: {warning}")

    def _adopt_data(self, train) -> None:
        """What the recipe takes over from its training data besides the classes (subclasses)."""

    # --- training -------------------------------------------------------------------------

    def fit(self, train_data, validation_data=None, callbacks=None, verbose="auto",
            checkpoint_dir=None, resume: bool = False) -> TrainingHistory:
        """Fine-tunes through ``self.phases``; returns the per-epoch history of all phases.

        ``train_data``/``validation_data``: what the task reads (an image folder path, a CSV,
        an ``.npz``, arrays, :class:`restransfer.data.ImageData`) or a batched
        ``tf.data.Dataset``. With no validation data, the source's own ``val`` part or a
        stratified ``val_fraction`` is used.

        ``checkpoint_dir`` saves model, optimizer, schedule and progress after every epoch;
        ``resume=True`` continues from there (same data order and augmentation as an
        uninterrupted run; bit-identical with ``deterministic=True``).
        """
        from restransfer.training import distribute
        from restransfer.training.checkpoints import Checkpointer

        # First: MultiWorkerMirroredStrategy must exist before other TensorFlow work runs.
        strategy = distribute.get_strategy(self.distribute)
        self.worker = distribute.worker(strategy)
        keras.utils.set_random_seed(self.seed)
        if self.deterministic:
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        train, val, steps = self._training_data(train_data, validation_data, verbose)
        objective = self.objective(train)
        checkpointer = Checkpointer(checkpoint_dir, writer=self.worker.is_chief) if checkpoint_dir else None
        feature_cache = self._feature_cache(train, checkpoint_dir) if strategy is None else None
        phases = self.phases
        if strategy is not None:
            if self.lr_scaling == "linear":
                phases = distribute.scale_learning_rates(phases, self.worker.replicas)
            kind = "multi_worker" if distribute.is_multi_worker(strategy) else "mirrored"
            print(f"distributed ({kind}): worker {self.worker.index + 1}/"
                  f"{self.worker.count}, {self.worker.replicas} replica(s), global batch "
                  f"{self.batch_size * self.worker.replicas}, learning rates x"
                  f"{self.worker.replicas if self.lr_scaling == 'linear' else 1}")
        state = None
        if resume and checkpointer is not None:
            with distribute.scope(strategy):
                model, state = checkpointer.load()
            if model is not None:
                configure_precision(self.precision)
                self.model = model
                print(f"resuming from {checkpointer.model_path}: phase {min(state['phase'] + 1, len(phases))}, "
                      f"{state['epoch']} epoch(s) done")
        if self.model is None:
            with distribute.scope(strategy):
                self.build()
        elif strategy is not None and state is None:  # a model built before: its variables into the scope
            self.model = distribute.copy_model(self.model, strategy)
        if strategy is not None:
            distribute.synchronize_batchnorm(self.model, self.sync_batchnorm)
        self.history = run_phases(
            self.model,
            phases,
            self._train_pipelines(train),
            # validated every epoch: decoded once (same pixels)
            self._pipeline(val, training=False, cache_pixels=True) if val is not None else None,
            steps_per_epoch=steps,
            objective=objective,
            patience=self.early_stopping_patience,
            callbacks=callbacks,
            verbose=verbose if self.worker.is_chief else 0,
            seed=self.seed,
            checkpointer=checkpointer,
            resume_state=state,
            feature_cache=feature_cache,
            strategy=strategy,
        )
        if strategy is not None:  # evaluate, predict, save and export on one device
            distribute.synchronize_batchnorm(self.model, False)
            self.model = distribute.copy_model(self.model)
        if self.skipped:
            print(f"{len(self.skipped)} unusable file(s) skipped: "
                  + ", ".join(os.path.basename(s.path) for s in self.skipped[:5])
                  + (" ..." if len(self.skipped) > 5 else ""))
        return self.history

    def _feature_cache(self, train, checkpoint_dir):
        """Head-only phases train on cached features: by default ("auto") only where that is
        exact (no augmentation); ``cache_features=True`` also caches ``cache_views``
        augmented views (see :mod:`restransfer.training.caching`). Only for heads on pooled
        features (the task's objective says whether its head can train on them)."""
        from restransfer.data.augmentation import Augmenter
        from restransfer.training.caching import FeatureCache

        if not isinstance(train, data_lib.ImageData) or not train.random_access or not self.cache_features:
            return None
        if self.backbone_pooling is None:
            return None
        if self.cache_features == "auto" and Augmenter(self.augmentation, self.image_size).active:
            return None
        cache_dir = Path(checkpoint_dir).parent / "cache" if checkpoint_dir else None
        return FeatureCache(train, self.image_size, self.batch_size, self.augmentation,
                            views=self.cache_views, seed=self.seed, cache_dir=cache_dir)

    def lr_find(self, train_data, phase: int | Phase = 0, steps: int = 200, min_lr: float = 1e-7,
                max_lr: float = 1.0):
        """Learning-rate range test for a phase (index into ``self.phases`` or a Phase); see
        :mod:`restransfer.training.lr_finder`. The sweep trains a copy: the recipe's model, its
        optimizer and what ``save`` writes stay as they were (and a recipe without a model
        stays without one)."""
        from restransfer.training.distribute import copy_model
        from restransfer.training.lr_finder import find_lr

        train, _, _ = self._training_data(train_data, None, verbose=0)
        phase = self.phases[phase] if isinstance(phase, int) else phase
        had_model = self.model is not None
        probe = copy_model(self.model) if had_model else self.build()
        if not had_model:
            self.model = None
        return find_lr(probe, self._pipeline(train, training=True), phase, self.objective(train),
                       min_lr=min_lr, max_lr=max_lr, steps=steps)

    # --- pixels in ------------------------------------------------------------------------

    def _input_pixels(self, images) -> list[np.ndarray]:
        """What ``predict`` is given (a path, paths, an array of images, a list of arrays), as
        decoded H x W x C pixels by the image contract: files decoded, arrays through the same
        channel rule."""
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None] if images.shape[-1] in (1, 3, 4) else images[..., None]
        pixels = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                pixels.append(self._load(image))
            else:
                image = np.asarray(image)
                image = image[..., None] if image.ndim == 2 else image
                pixels.append(data_lib.to_contract_pixels(image[None], self.channels)[0])
        return pixels

    def _resized(self, pixels: list[np.ndarray]) -> np.ndarray:
        """The one resize (:func:`restransfer.data.resize_image`) of decoded images, stacked."""
        return np.stack([np.asarray(data_lib.resize_image(image, self.image_size)) for image in pixels])

    def _load(self, path):
        """One file decoded exactly as this recipe's pipelines decode it."""
        return data_lib.load_image(path, self.channels, bool(self.keep_precision), **self.decode_options)

    def _export_samples(self, images, count: int = 4):
        """(decoded pixels, original file bytes or None) of a few real images: the export's
        warm-up requests and its parity check on original files."""
        if isinstance(images, data_lib.ImageData):
            if images.paths is None:
                return images.first_images(count), None
            images = images.paths[:count]
        if images is None or not len(images) or not isinstance(images[0], (str, os.PathLike)):
            return images, None
        decoded = [self._load(path) for path in images[:8]]
        encoded = [None if data_lib.is_client_side(path) else Path(path).read_bytes() for path in images[:8]]
        return decoded, encoded

    def _export_portable(self, out_dir, format: str, model_name=None, version=None, quantization=None,
                         heldout=None, representative=None, max_metric_drop: float = 0.02, allow_drop: bool = False):
        """A LiteRT or ONNX file checked in its runtime (see :mod:`restransfer.serving.portable`)."""
        from restransfer.serving.portable import export_portable

        if not self.worker.is_chief:
            print(f"worker {self.worker.index}: only the chief exports; nothing written")
            return Path(out_dir)
        return export_portable(self, out_dir, format=format, quantization=quantization, heldout=heldout,
                               representative=representative, model_name=model_name, version=version,
                               max_metric_drop=max_metric_drop, allow_drop=allow_drop)

    def describe(self) -> dict:
        """What a model card needs to know about this recipe (no absolute paths)."""
        weights = self.weights
        if weights is not None and str(weights).lower() != "imagenet":
            weights = os.path.basename(str(weights))
        return {
            "task": self.task,
            "backbone": self.backbone_name,
            "weights": weights,
            "image_size": self.image_size,
            "channels": self.channels,
            "phases": [phase.model_dump(exclude_defaults=True) for phase in self.phases],
            "history": (self.history.history if self.history else None),
            "kept_weights": (self.history.kept if self.history else []),
            "skipped_files": [{"path": os.path.basename(s.path), "reason": s.reason} for s in self.skipped],
        }

    # --- persistence --------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the model (classes, image contract and decision rule included) as a
        ``.keras`` file, atomically (a reader never sees a half-written file)."""
        path = Path(path)
        if path.suffix != ".keras":
            raise ValueError(f"save() writes a .keras file; got {path}")
        if not self.worker.is_chief:
            print(f"worker {self.worker.index}: only the chief saves; {path} not written")
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(suffix=".keras", dir=path.parent, prefix=".saving-")
        os.close(handle)
        try:
            self._require_model().save(temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, safe_mode: bool = True, **options):
        """Loads a model saved by :meth:`save`. ``safe_mode`` (Keras) refuses code in the file.
        ``options``: further constructor arguments (e.g. a run's medical options); what the
        model file says about itself (backbone, classes, input size, head) wins."""
        model = keras.saving.load_model(str(path), safe_mode=safe_mode)
        return cls.from_model(model, **options)

    @classmethod
    def from_model(cls, model: keras.Model, **options):
        """A recipe around a loaded model (see :meth:`load`)."""
        head = find_head(model)
        backbone = stages_lib.find_backbone(model)
        height, _, channels = model.input_shape[1:]
        contract = head.image_contract
        recipe = cls(**{
            **options,
            "backbone": backbone.name,
            "weights": None,
            "class_names": head.class_names,
            "num_classes": None,
            "image_size": height,
            "channels": channels,
            **({"decode_options": contract["decode_options"]} if "decode_options" in contract else {}),
            **cls._arguments_saved_in(model, head),
        })
        recipe.keep_precision = bool(contract.get("keep_precision", False))
        recipe.model = model
        return recipe


def is_tf_dataset(obj) -> bool:
    import tensorflow as tf

    return isinstance(obj, tf.data.Dataset)


def load(path: str | os.PathLike, safe_mode: bool = True, **options) -> Recipe:
    """Any model saved by a recipe, as the recipe of its task (the task its head names)."""
    from restransfer.tasks.registry import TASKS

    for spec in TASKS.values():  # their modules register the layers (heads, decoders) the file names
        spec.recipe_class()
    model = keras.saving.load_model(str(path), safe_mode=safe_mode)
    task = getattr(find_head(model), "task", None) or "classification"
    return TASKS[task].recipe_class().from_model(model, **options)
