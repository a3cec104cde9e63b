"""Fine-tuning phases and their presets, as plain validated data (no TensorFlow import).

:class:`Phase` is both the Python API and the YAML schema of one entry of ``fine_tune:``,
so a field flows from a recipe file to training unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from restransfer.models.registry import STAGES, parse_stages
from restransfer.suggest import unknown_name

PRESETS = ("head_only", "keras_guide", "two_phase", "gradual")


class Phase(BaseModel):
    """One fine-tuning phase.

    Attributes:
        trainable: ``"head"``, ``"all"``, a stage (``"stage4"``) or ``"stage3+"``.
        epochs: epochs in this phase (early stopping may end it sooner).
        lr: peak learning rate of the head (and of stages without a multiplier).
        schedule: ``constant``; ``cosine`` (to 0 over the phase, after warmup);
            ``one_cycle`` (warm up over the first 30 % from lr/25, then cosine to lr/1e4);
            ``step`` (times ``step_gamma`` every ``step_epochs``).
        warmup_epochs: linear warmup from 0 (``constant``/``cosine``).
        lr_mult: discriminative rates: stage4 trains at ``lr * lr_mult``, stage3 at
            ``lr * lr_mult**2``, ... the stem at ``lr * lr_mult**5``.
        stage_lrs: explicit rates per stage (``{"stage4": 1e-4}``); overrides ``lr_mult``.
        train_bn: keep BatchNorm layers of frozen stages trainable (fastai's ``train_bn``);
            the default keeps them in inference mode.
        optimizer: ``adam``, ``adamw`` (decoupled weight decay, not on BN or biases) or
            ``sgd`` (Nesterov momentum 0.9).
        weight_decay: for ``adamw``/``sgd``.
        label_smoothing: single-label cross-entropy smoothing.
        mixup: MixUp alpha (0 = off); Keras' own MixUp layer on training batches.
        ema: evaluate and keep an exponential moving average of the weights (Keras
            optimizers' ``use_ema``), swapped in at the end of the phase.
        gradient_clip: clip gradients to this global norm.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    trainable: str = "head"
    epochs: int = Field(3, ge=0, le=10_000)
    lr: float = Field(1e-3, gt=0, le=10)
    schedule: Literal["constant", "cosine", "one_cycle", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_epochs: int = Field(1, ge=1)
    step_gamma: float = Field(0.1, gt=0, le=1)
    lr_mult: float = Field(1.0, gt=0, le=1)
    stage_lrs: dict[str, float] | None = None
    train_bn: bool = False
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, le=10)
    ema: bool = False
    gradient_clip: float | None = Field(None, gt=0)

    def __init__(self, trainable: str | None = None, /, **fields):
        # Phase("head", epochs=2) as well as Phase(trainable="head", epochs=2)
        if trainable is not None:
            fields["trainable"] = trainable
        super().__init__(**fields)

    @field_validator("trainable")
    @classmethod
    def _known_stages(cls, value: str) -> str:
        parse_stages(value)  # ValueError names the bad spec
        return value.strip().lower()

    @field_validator("stage_lrs")
    @classmethod
    def _known_stage_rates(cls, value):
        if value is None:
            return value
        for stage, rate in value.items():
            if stage not in STAGES:
                raise ValueError(f"stage_lrs: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
            if not rate > 0:
                raise ValueError(f"stage_lrs.{stage} must be > 0, got {rate}")
        return value

    def stage_learning_rates(self) -> dict[str, float]:
        """The learning rate of every trainable stage in this phase."""
        rates = {}
        for stage in parse_stages(self.trainable):
            depth = len(STAGES) - STAGES.index(stage)  # stage4 -> 1 ... stem -> 5
            rates[stage] = self.lr * self.lr_mult ** depth
        if self.stage_lrs:
            rates.update({k: v for k, v in self.stage_lrs.items() if k in rates})
        return rates


def default_phases(epochs: int = 3, lr_mult: float = 0.4) -> list[Phase]:
    """restransfer's default: the ``two_phase`` preset (see bench/RESULTS.md for why); a recipe
    passes its task's ``lr_mult`` (restransfer.tasks.registry)."""
    return preset("two_phase", epochs=2 * epochs, lr_mult=lr_mult)


def preset(name: str, epochs: int = 6, lr: float = 1e-3, lr_mult: float = 0.4) -> list[Phase]:
    """Named fine-tuning plans over a total budget of ``epochs``.

    * ``head_only``: linear probe, backbone frozen throughout.
    * ``keras_guide``: the Keras transfer-learning guide: head with the backbone frozen,
      then everything at 1e-5 (constant rates, Adam).
    * ``two_phase``: fastai ``fine_tune``: one-cycle on the head, then unfreeze everything
      with discriminative rates (``lr_mult`` 0.4: the stem 100x below stage4) on a one-cycle
      at half the head's rate. As in
      fastai (``train_bn=True``), the frozen backbone's BatchNorm layers train during the
      head phase, so their statistics adapt to the new images before the convolutions move.
    * ``gradual``: ULMFiT-style: the head, then one more stage per phase from the top,
      with discriminative rates.

    ``lr_mult`` is the discriminative factor (0.4: classification's; a recipe given a preset by
    name uses its task's, which for segmentation is 1.0, one rate for every stage).
    """
    if epochs < 1:
        raise ValueError(f"a preset needs epochs >= 1, got {epochs}")
    if name == "head_only":
        return [Phase("head", epochs=epochs, lr=lr, schedule="cosine")]
    if name == "keras_guide":
        first = max(1, epochs // 2)
        return [Phase("head", epochs=first, lr=lr, schedule="constant"),
                Phase("all", epochs=epochs - first, lr=1e-5, schedule="constant")]
    if name == "two_phase":
        first = max(1, epochs // 4)
        return [Phase("head", epochs=first, lr=lr * 2, schedule="one_cycle", train_bn=True),
                Phase("all", epochs=epochs - first, lr=lr, schedule="one_cycle", lr_mult=lr_mult)]
    if name == "gradual":
        tops = ["head", "stage4", "stage3+", "stage2+", "all"]
        count = min(len(tops), epochs)
        per_phase = [epochs // count + (1 if i < epochs % count else 0) for i in range(count)]
        return [Phase(tops[i], epochs=per_phase[i], lr=lr if i == 0 else lr / 2,
                      schedule="one_cycle", lr_mult=lr_mult) for i in range(count)]
    raise ValueError(unknown_name("fine-tuning preset", name, PRESETS))
