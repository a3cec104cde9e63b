"""One question about the network, asked without waiting minutes: can a download's host be
reached at all? (Plain Python; the lowest layer.)"""

from __future__ import annotations

import functools


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url``'s host cannot be reached (one TCP connection attempt, asked once per host
    and process), or None."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if not parsed.hostname:
        return None
    return _unreachable(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)


@functools.lru_cache(maxsize=None)
def _unreachable(host: str, port: int, timeout: float) -> str | None:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}: {error}"
    return None
