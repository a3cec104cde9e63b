"""Names that become paths: one rule for every name a recipe or a command line gives (a run
name, an export's model name, a file written per input image), so none can climb out of the
folder it is meant to live in. Plain Python; the lowest layer."""

from __future__ import annotations

import os
import re
from pathlib import Path

# One path component: starts with a letter, digit or "_" (so never "", ".", ".." or hidden),
# then letters, digits, "_", "-", "." -- no separators.
COMPONENT = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
_COMPONENT = re.compile(COMPONENT)


class PathEscape(ValueError):
    """A name that would make a path outside its root (``..``, ``/``, a symlink out)."""


def check_component(name: str, what: str) -> str:
    """``name`` if it is one safe path component; else :class:`PathEscape` naming ``what``."""
    if not isinstance(name, str) or not _COMPONENT.match(name) or len(name) > 200:
        raise PathEscape(f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' "
                         "(not first), no '/' and not '.' or '..'")
    return name


def child(root: str | os.PathLike, name: str, what: str) -> Path:
    """``root/name``, refused unless it is strictly inside ``root`` once symlinks are resolved
    (a run directory replaced by a symlink to elsewhere is refused too)."""
    check_component(name, what)
    root = Path(root)
    path = root / name
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved == resolved_root or not resolved.is_relative_to(resolved_root):
        raise PathEscape(f"{what} {name!r}: {path} resolves to {resolved}, outside {resolved_root}")
    return path


def file_stem(path: str | os.PathLike, index: int) -> str:
    """A safe file-name stem for output written per input file (masks, overlays): the input's
    stem with unsafe characters replaced, prefixed by its position so two inputs of the same
    name never overwrite each other."""
    name = re.sub(r"\.(nii\.gz|[A-Za-z0-9]{1,5})(#\d+)?$", r"\2", Path(str(path)).name)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "image"
    return f"{index:04d}_{stem[:80]}"
