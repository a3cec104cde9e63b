"""Training: how a model is fine-tuned, phase by phase.

- :mod:`~restransfer.training.phases`: ``Phase`` and the presets (plain data, no TF);
- :mod:`~restransfer.training.schedules`, :mod:`~restransfer.training.optimizers`,
  :mod:`~restransfer.training.losses`: one phase's rate schedule, optimizer (per-stage
  rates), loss, metrics and compile;
- :mod:`~restransfer.training.loop`: ``run_phases``, the history, the NaN guard;
- :mod:`~restransfer.training.checkpoints`: exact resume after a crash;
- :mod:`~restransfer.training.caching`: backbone features cached for head-only phases;
- :mod:`~restransfer.training.lr_finder`: the learning-rate range test;
- :mod:`~restransfer.training.distribute`: tf.distribute strategies and the multi-worker step.

May import models and data; never tasks, evaluation, serving or cli.
"""
