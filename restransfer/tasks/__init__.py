"""Tasks: what each task contributes to the machinery every recipe shares.

- :mod:`~restransfer.tasks.base`: ``Recipe``, the shared machinery (phases, ``fit``, resume,
  checkpoints, the feature cache, distribution, the image contract, ``save``/``load``, export
  plumbing) and ``load``, which gives back any saved model as the recipe of its task;
- :mod:`~restransfer.tasks.registry`: the tasks a recipe file names and their defaults (plain data);
- :mod:`~restransfer.tasks.classification`: ``ClassificationRecipe`` (single- and multi-label);
- :mod:`~restransfer.tasks.medical`: ``MedicalImagingRecipe``: class weights, focal loss,
  thresholds, clinical metrics, TTA, Grad-CAM;
- :mod:`~restransfer.tasks.segmentation`: ``SegmentationRecipe``: a U-Net on the backbone's
  stages, image/mask pairs, Dice/IoU, masks served as PNG bytes.

May import models, data, training, evaluation and serving; never cli.
"""
