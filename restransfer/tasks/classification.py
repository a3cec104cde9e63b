"""ClassificationRecipe: a backbone, a task head and a fine-tuning plan behind
fit / evaluate / predict / save / load / export. The base of every recipe."""

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
from restransfer.models.decision import DecisionRule, model_probabilities
from restransfer.models.heads import ClassifierHead, find_head
from restransfer.training.losses import compile_model, one_hot_labels
from restransfer.training.loop import TrainingHistory, run_phases
from restransfer.training.phases import Phase, default_phases, preset


class ClassificationRecipe:
    """Single-label (softmax) or multi-label (sigmoid) image classification by fine-tuning.

    Example::

        recipe = ClassificationRecipe(backbone="resnet50", weights="imagenet", image_size=224)
        history = recipe.fit("data/hymenoptera")         # train/ and val/ sub-folders
        recipe.evaluate("data/hymenoptera/val")
        probabilities = recipe.predict(["ant.jpg"])
        recipe.save("run/model.keras")
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | os.PathLike | None = "imagenet",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        image_size: int = 224,
        channels: int = 3,
        multi_label: bool = False,
        head_dropout: float = 0.2,
        head_hidden_units: int | None = None,
        phases: list[Phase] | str | None = None,
        batch_size: int = 32,
        augmentation="light",
        early_stopping_patience: int | None = 3,
        val_fraction: float = 0.2,
        bad_images: str = "skip",
        precision: str = "auto",
        deterministic: bool = False,
        cache_features="auto",
        cache_views: int = 1,
        stem: str = "replicate",
        decode_options: dict | None = None,
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
        self.backbone_name = backbone.lower()
        self.weights = weights
        self.class_names = list(class_names) if class_names else None
        self.num_classes = num_classes or (len(class_names) if class_names else None)
        self.image_size = int(image_size)
        self.channels = channels
        self.multi_label = multi_label
        self.head_dropout = head_dropout
        self.head_hidden_units = head_hidden_units
        if isinstance(phases, str):
            phases = preset(phases)
        self.phases = list(phases) if phases is not None else default_phases()
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.early_stopping_patience = early_stopping_patience
        self.val_fraction = val_fraction
        self.bad_images = bad_images
        self.precision = precision
        self.deterministic = deterministic
        if cache_features not in ("auto", True, False):
            raise ValueError(f"cache_features must be 'auto', True or False, got {cache_features!r}")
        self.cache_features = cache_features
        self.cache_views = cache_views
        self.stem = stem
        self.decode_options = dict(decode_options or {})
        self.download_data = download_data
        self.keep_precision = False  # 16-bit files at full precision: set by fit from the data
        self.distribute = distribute
        self.lr_scaling = lr_scaling
        self.sync_batchnorm = sync_batchnorm
        self.worker = distribute_lib.Worker()  # this process's place in the cluster, set by fit
        self.seed = seed
        self.model: keras.Model | None = None
        self.skipped: list[data_lib.SkippedFile] = []
        self.history: TrainingHistory | None = None

    # --- model --------------------------------------------------------------------------

    def build(self) -> keras.Model:
        """Builds backbone + head (done by ``fit`` when the class count is known)."""
        if self.num_classes is None:
            raise ValueError("num_classes (or class_names) is needed to build the model")
        configure_precision(self.precision)
        shape = (self.image_size, self.image_size, self.channels)
        backbone = build_backbone(self.backbone_name, weights=self.weights, input_shape=shape,
                                  stem=self.stem)
        inputs = keras.Input(shape=shape, name="image")
        head = ClassifierHead(
            self.num_classes,
            multi_label=self.multi_label,
            dropout=self.head_dropout,
            hidden_units=self.head_hidden_units,
            class_names=self.class_names,
            image_contract={"keep_precision": self.keep_precision, "decode_options": self.decode_options},
            decision=DecisionRule.default(self.multi_label, self.num_classes,
                                          **self._decision_options()).get_config(),
            name="head",
        )
        self.model = keras.Model(inputs, head(backbone(inputs)), name=f"{self.backbone_name}_classifier")
        self.class_names = head.class_names
        return self.model

    def _decision_options(self) -> dict:
        """Options of the decision rule a new model starts with (subclasses: test-time views)."""
        return {}

    @property
    def decision(self) -> DecisionRule:
        """The model's decision rule (stored in its head): what ``predict_labels``, the CLI and
        the SavedModel's ``predictions`` apply."""
        return find_head(self._require_model()).decision

    def _require_model(self) -> keras.Model:
        if self.model is None:
            raise RuntimeError("the recipe has no model yet: call fit() or build() first")
        return self.model

    def freeze(self, up_to: str = "stage4") -> None:
        stages_lib.freeze(self._require_model(), up_to=up_to)

    def unfreeze(self, stages: str = "all") -> None:
        stages_lib.unfreeze(self._require_model(), stages)

    # --- data ---------------------------------------------------------------------------

    def read_options(self) -> dict:
        """How this recipe reads a source: the options every door shares."""
        return dict(policy=self.bad_images, channels=self.channels, decode_options=self.decode_options,
                    download=self.download_data)

    def _as_data(self, source, split=None) -> data_lib.ImageData:
        data = data_lib.as_image_data(source, class_names=self.class_names, split=split, **self.read_options())
        self.skipped += data.skipped
        return data

    def _pipeline(self, data, training: bool, start_epoch: int = 0, cache_pixels: bool | None = None):
        """Batches for this process. Several replicas on one machine: batches of
        ``batch_size`` x replicas, which Keras splits. Several workers: training batches of
        ``batch_size`` from this worker's shard of the files, one per replica and step."""
        worker = self.worker
        sharded = training and worker.count > 1
        if _is_tf_dataset(data):
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
        if _is_tf_dataset(train):
            if self.worker.count > 1:
                return lambda start_epoch: self._pipeline(train, training=True)
            return train
        return lambda start_epoch: self._pipeline(train, training=True, start_epoch=start_epoch)

    def _training_data(self, train_data, validation_data):
        if _is_tf_dataset(train_data):
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
            return train_data, validation_data, batches // self.worker.count
        user_val = validation_data if _is_tf_dataset(validation_data) else None
        splits = data_lib.resolve_splits(
            train_data, None if user_val is not None else validation_data, class_names=self.class_names,
            val_fraction=0 if user_val is not None else self.val_fraction, with_test=False,
            seed=self.seed, **self.read_options())
        train = splits.train
        self.keep_precision = train.keep_precision
        self.skipped += [s for _, part in splits.items() for s in part.skipped]
        if self.class_names is None:
            self.class_names = train.class_names
            self.num_classes = train.num_classes
        self.multi_label = self.multi_label or train.multi_label
        self._check_task()
        from restransfer.training.distribute import steps_per_epoch

        return train, user_val if user_val is not None else splits.val, \
            steps_per_epoch(len(train), self.batch_size, self.worker)

    # --- fit / evaluate / predict -------------------------------------------------------

    def fit(self, train_data, validation_data=None, callbacks=None, verbose="auto",
            checkpoint_dir=None, resume: bool = False) -> TrainingHistory:
        """Fine-tunes through ``self.phases``; returns the per-epoch history of all phases.

        ``train_data``/``validation_data``: an image folder path (with or without
        train/val sub-folders), an ``(images, labels)`` tuple, :class:`ImageData`, or a
        batched ``tf.data.Dataset`` of (raw 0-255 images, labels). With no validation
        data, a folder's ``val/`` sub-folder or a stratified ``val_fraction`` is used.

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
        train, val, steps = self._training_data(train_data, validation_data)
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
                print(f"resuming from {checkpointer.model_path}: phase {state['phase'] + 1}, "
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
            multi_label=self.multi_label,
            num_classes=self.num_classes,
            patience=self.early_stopping_patience,
            callbacks=callbacks,
            verbose=verbose if self.worker.is_chief else 0,
            seed=self.seed,
            checkpointer=checkpointer,
            resume_state=state,
            feature_cache=feature_cache,
            strategy=strategy,
            **self._fit_options(train),
        )
        if strategy is not None:  # evaluate, predict, save and export on one device
            distribute.synchronize_batchnorm(self.model, False)
            self.model = distribute.copy_model(self.model)
        if self.skipped:
            print(f"{len(self.skipped)} unusable file(s) skipped: "
                  + ", ".join(os.path.basename(s.path) for s in self.skipped[:5])
                  + (" ..." if len(self.skipped) > 5 else ""))
        return self.history

    def _fit_options(self, train) -> dict:
        """Extra options for :func:`run_phases` (subclasses add class weights, losses)."""
        return {}

    def _check_task(self) -> None:
        """Refuses, before any training, what the task cannot do with these classes (subclasses)."""

    def _feature_cache(self, train, checkpoint_dir):
        """Head-only phases train on cached features: by default ("auto") only where that is
        exact (no augmentation); ``cache_features=True`` also caches ``cache_views``
        augmented views (see :mod:`restransfer.training.caching`)."""
        from restransfer.data.augmentation import Augmenter
        from restransfer.training.caching import FeatureCache

        if not isinstance(train, data_lib.ImageData) or not train.random_access or not self.cache_features:
            return None
        if self.cache_features == "auto" and Augmenter(self.augmentation, self.image_size).active:
            return None
        cache_dir = Path(checkpoint_dir).parent / "cache" if checkpoint_dir else None
        return FeatureCache(train, self.image_size, self.batch_size, self.augmentation,
                            views=self.cache_views, seed=self.seed, cache_dir=cache_dir)

    def lr_find(self, train_data, phase: int | Phase = 0, steps: int = 200, min_lr: float = 1e-7,
                max_lr: float = 1.0):
        """Learning-rate range test for a phase (index into ``self.phases`` or a Phase);
        the model's weights are restored afterwards. See :mod:`restransfer.training.lr_finder`."""
        from restransfer.training.lr_finder import find_lr

        train, _, _ = self._training_data(train_data, None)
        if self.model is None:
            self.build()
        phase = self.phases[phase] if isinstance(phase, int) else phase
        return find_lr(self.model, self._pipeline(train, training=True), phase, self.num_classes,
                       self.multi_label, min_lr=min_lr, max_lr=max_lr, steps=steps)

    def evaluate(self, data, verbose=0) -> dict[str, float]:
        """Loss and metrics on labelled data (same kinds of input as ``fit``)."""
        model = self._require_model()
        if not model.compiled:
            compile_model(model, keras.optimizers.Adam(), self.multi_label)
        source = data if _is_tf_dataset(data) else self._as_data(data, split="test")
        pipeline = self._pipeline(source, training=False)
        if not self.multi_label:
            pipeline = one_hot_labels(pipeline, self.num_classes)
        result = model.evaluate(pipeline, verbose=verbose, return_dict=True)
        return {k: float(v) for k, v in result.items()}

    def predict(self, images, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities for images: an array (N, H, W, C) of raw pixels (any size),
        a list of image file paths, or one path."""
        model = self._require_model()
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
            images = [self._load(path) for path in images]
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None] if images.shape[-1] in (1, 3, 4) else images[..., None]
        resized = np.stack(
            [np.asarray(data_lib.resize_image(image, self.image_size)) for image in images]
        )
        return model_probabilities(model, resized, self.decision.test_time_augmentation,
                                   batch_size=batch_size or self.batch_size)

    def predict_dataset(self, data) -> np.ndarray:
        """Probabilities for every image of labelled data (folder, ImageData, ...), in order."""
        source = data if _is_tf_dataset(data) else self._as_data(data, split="test")
        images_only = self._pipeline(source, training=False).map(lambda x, *_: x)
        return model_probabilities(self._require_model(), images_only, self.decision.test_time_augmentation)

    def decide(self, probabilities) -> list:
        """The model's decision (its :attr:`decision` rule) for rows of probabilities: a class
        name per image (single-label) or a list of names per image (multi-label)."""
        rule = self.decision
        return rule.names(rule.decide(probabilities, self.class_names), self.class_names)

    def predict_labels(self, images) -> list:
        """Decided class names for images (see :meth:`decide`): argmax, a binary threshold
        chosen by a medical recipe, or per-label thresholds (0.5 unless chosen)."""
        return self.decide(self.predict(images))

    def export(self, out_dir, model_name: str | None = None, version: int | None = None,
               top_k: int = 5, warmup_images=None, thresholds=None) -> Path:
        """SavedModel for TensorFlow Serving (see :mod:`restransfer.serving.export`).
        ``warmup_images``: image files, raw pixel arrays, or ImageData (its first 4 images)."""
        from restransfer.serving.export import export_saved_model

        if not self.worker.is_chief:
            print(f"worker {self.worker.index}: only the chief exports; nothing written")
            return Path(out_dir)
        decoded, encoded = self._export_samples(warmup_images)
        decision = self.decision
        if thresholds is not None:  # per-label thresholds for this export only
            decision = DecisionRule("per_label", thresholds=[float(t) for t in thresholds],
                                    test_time_augmentation=decision.test_time_augmentation)
            decision.check(self.class_names, self.multi_label)
        return export_saved_model(
            self._require_model(), out_dir, class_names=self.class_names,
            image_size=self.image_size, model_name=model_name or self.backbone_name,
            version=version, top_k=top_k, decision=decision,
            warmup_images=decoded, encoded_images=encoded, keep_precision=self.keep_precision,
            metadata=self.describe(),
        )

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

    def _load(self, path):
        """One file decoded exactly as this recipe's pipelines decode it."""
        return data_lib.load_image(path, self.channels, self.keep_precision, **self.decode_options)

    def describe(self) -> dict:
        """What a model card needs to know about this recipe (no absolute paths)."""
        weights = self.weights
        if weights is not None and str(weights).lower() != "imagenet":
            weights = os.path.basename(str(weights))
        return {
            "backbone": self.backbone_name,
            "weights": weights,
            "image_size": self.image_size,
            "channels": self.channels,
            "phases": [phase.model_dump(exclude_defaults=True) for phase in self.phases],
            "history": (self.history.history if self.history else None),
            "skipped_files": len(self.skipped),
        }

    # --- persistence --------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the model (class names included) as a ``.keras`` file, atomically."""
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
            os.replace(temporary, path)  # a reader never sees a half-written file
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return path

    @classmethod
    def _options_saved_in(cls, head) -> dict:
        """Constructor arguments the head's saved decision rule implies (subclasses)."""
        return {}

    @classmethod
    def load(cls, path: str | os.PathLike, safe_mode: bool = True, **options) -> "ClassificationRecipe":
        """Loads a model saved by :meth:`save`. ``safe_mode`` (Keras) refuses code in the file.
        ``options``: further constructor arguments (e.g. a run's medical options); what the
        model file says about itself (backbone, classes, input size, head) wins."""
        model = keras.saving.load_model(str(path), safe_mode=safe_mode)
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
            "multi_label": head.multi_label,
            "head_dropout": head.dropout_rate,
            "head_hidden_units": head.hidden_units,
            **({"decode_options": contract["decode_options"]} if "decode_options" in contract else {}),
            **cls._options_saved_in(head),
        })
        recipe.keep_precision = bool(contract.get("keep_precision", False))
        recipe.model = model
        return recipe


def _is_tf_dataset(obj) -> bool:
    import tensorflow as tf

    return isinstance(obj, tf.data.Dataset)
