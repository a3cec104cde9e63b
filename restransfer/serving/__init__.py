"""Serving: SavedModel export in the layout TensorFlow Serving loads as is
(:mod:`~restransfer.serving.export`). May import models and data; never tasks or cli."""
