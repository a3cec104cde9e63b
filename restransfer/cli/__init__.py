"""The ``restransfer`` command and what it runs: recipe files and run directories.

- :mod:`~restransfer.cli.main`: the commands (``train``, ``predict``, ``export``, ...);
- :mod:`~restransfer.cli.config`: the recipe-file schema, ``extends``, ``--set``, file:line errors;
- :mod:`~restransfer.cli.runs`: a recipe file -> a recipe -> a run directory (train, resume,
  lock, cross-validation, report, export).

The top of the stack: may import every other package. ``--help`` imports no TensorFlow.
"""

from restransfer.cli.main import main

__all__ = ["main"]
