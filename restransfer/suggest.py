"""'did you mean' for every name a user types: backbones, presets, transforms, recipe keys."""

from __future__ import annotations


def unknown_name(kind: str, name, choices) -> str:
    """'unknown backbone 'resnet05'; did you mean 'resnet50'?' (or the list of choices)."""
    import difflib

    close = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choices: {', '.join(map(str, choices))}"
    return f"unknown {kind} {name!r}; {hint}"
