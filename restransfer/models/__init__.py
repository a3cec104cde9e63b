"""Models: the backbone registry, backbone builders, weights, preprocessing, stages, heads.

- :mod:`~restransfer.models.registry`: backbone specs and stage names as plain data (no TF);
- :mod:`~restransfer.models.backbones`: ``build_backbone`` (keras.applications and
  torchvision layouts, the 1-channel summed stem);
- :mod:`~restransfer.models.weights` / :mod:`~restransfer.models.cache`: which file a
  weights name means, loading it, where downloads are cached;
- :mod:`~restransfer.models.preprocessing`: the normalisation layer inside every model;
- :mod:`~restransfer.models.stages`: the one layer walker, named stages, freeze/unfreeze;
- :mod:`~restransfer.models.heads`: the classifier head (it carries the class names).

May import :mod:`restransfer.data` decoding helpers; never training, tasks or cli.
"""
