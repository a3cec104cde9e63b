"""Evaluation: what a trained model is worth and why it decides as it does.

- :mod:`~restransfer.evaluation.metrics`: clinical metrics, thresholds, bootstrap CIs, calibration;
- :mod:`~restransfer.evaluation.report`: the self-contained ``report.html``;
- :mod:`~restransfer.evaluation.gradcam`: Grad-CAM heat maps and overlays.

May import models and data; never training, tasks or cli.
"""
