"""Tasks: recipes that put a backbone, a head and a fine-tuning plan behind
fit / evaluate / predict / save / load / export.

- :mod:`~restransfer.tasks.classification`: ``ClassificationRecipe`` (single- and multi-label),
  the base every recipe extends;
- :mod:`~restransfer.tasks.medical`: ``MedicalImagingRecipe``: class weights, focal loss,
  thresholds, clinical metrics, TTA, Grad-CAM.

May import models, data, training, evaluation and serving; never cli.
"""
