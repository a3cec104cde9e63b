"""Getting a weights preset's file onto disk: download, verify, cache, import (no TensorFlow).

* Direct URLs (``http(s)://``, ``file://``) stream into ``<cache>/<backbone>/`` through a
  temporary file while being hashed; only a file whose hash matches the preset is renamed
  into place, so a truncated or corrupted download is never cached. A broken transfer is
  retried.
* Hugging Face hub presets go through ``huggingface_hub`` (its cache, its ``HF_HUB_OFFLINE``
  mode); the file it returns is verified against the preset's SHA-256, or, when only the hub
  knows it, against the content address of its cache blob (the SHA-256 of an LFS file).
* Keras' own files (``keras`` presets) live in Keras' cache (``$KERAS_HOME/models``), where
  ``keras.applications`` looks for them and checks their MD5.

The cache is ``$RESTRANSFER_CACHE`` if set, else ``$XDG_CACHE_HOME/restransfer`` (default
``~/.cache/restransfer``). Keras' urllib-based ``get_file`` is not used for the rest: it can
leave a file that failed its hash check in the cache, and it cannot check torchvision's
published hash prefixes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A weights file could not be fetched or failed its check; nothing was cached."""


def keras_cache_dir() -> Path:
    """The directory Keras' ``get_file`` caches into (``$KERAS_HOME`` or ``~/.keras``)."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"])
    home = Path(os.path.expanduser("~")) / ".keras"
    return home if os.access(home.parent, os.W_OK) else Path("/tmp/.keras")


def cache_dir() -> Path:
    if os.environ.get("RESTRANSFER_CACHE"):
        return Path(os.environ["RESTRANSFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "restransfer"


def cached_path(preset) -> Path:
    """Where ``preset``'s file lives once fetched (it may not exist yet)."""
    if preset.layout == "keras":
        return keras_cache_dir() / "models" / preset.file_name
    return cache_dir() / preset.backbone / f"{preset.name}-{preset.file_name}"


def unavailable(preset, timeout: float = 3.0) -> str | None:
    """Why ``preset`` cannot be loaded here, said before anything heavy runs (None: it can, or
    it can be downloaded): not cached, and its host cannot be reached."""
    if cached_path(preset).is_file():
        return None
    if preset.hub_repo:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(preset.hub_repo, preset.file_name, revision=preset.hub_revision), str):
            return None
        url = "https://huggingface.co"
    else:
        url = preset.url
    from restransfer.net import unreachable

    reason = unreachable(url, timeout)
    if reason is None:
        return None
    where = "the Hugging Face cache" if preset.hub_repo else cached_path(preset)
    return (f"{preset.id}: {preset.file_name} is not cached ({where}) and cannot be downloaded "
            f"({reason}). On a machine with internet run `restransfer weights download {preset.id}` and copy "
            f"the file to that path, or bring the file and run `restransfer weights import FILE --as {preset.id}`")


def file_digests(path) -> tuple[str, str]:
    """(SHA-256, MD5) hex digests of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def matches(preset, sha256: str, md5: str) -> bool:
    """Whether digests are those the preset publishes (a SHA-256 prefix counts, as in torch.hub)."""
    if preset.sha256:
        return sha256.startswith(preset.sha256.lower())
    if preset.md5:
        return md5 == preset.md5.lower()
    return False


def _expected(preset) -> str:
    return f"SHA-256 {preset.sha256}{'...' if len(preset.sha256) < 64 else ''}" if preset.sha256 \
        else f"MD5 {preset.md5}"


def _verify(preset, path: Path, where: str) -> None:
    sha256, md5 = file_digests(path)
    if not matches(preset, sha256, md5):
        raise DownloadError(f"{where}: expected {_expected(preset)}, got SHA-256 {sha256} (MD5 {md5}); "
                            f"the file is corrupted or is not {preset.id}")


def fetch(preset, progress: bool = True, attempts: int = 3) -> Path:
    """The preset's file on disk: from the cache (verified), else downloaded and verified."""
    target = cached_path(preset)
    if target.is_file():
        if preset.sha256 or preset.md5:  # (a hub file imported by hand has only the hub's hash)
            _verify(preset, target, f"cached {target}")
        return target
    if preset.hub_repo:
        return _from_hub(preset)
    return download_url(preset, target, progress=progress, attempts=attempts)


def download_url(preset, target: Path, progress: bool = True, attempts: int = 3,
                 timeout: float = 30.0) -> Path:
    """Streams ``preset.url`` to ``target`` through a temporary file, hashing as it goes."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            sha, md5, received = hashlib.sha256(), hashlib.md5(), 0
            with urllib.request.urlopen(preset.url, timeout=timeout) as response, open(partial, "wb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {preset.id}",
                          disable=not progress, leave=False) as bar:
                    for chunk in iter(lambda: response.read(CHUNK), b""):
                        out.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if total is not None and received != total:
                raise ConnectionError(f"transfer ended after {received} of {total} bytes")
            if not matches(preset, sha.hexdigest(), md5.hexdigest()):
                partial.unlink(missing_ok=True)
                raise DownloadError(
                    f"{preset.url}: expected {_expected(preset)}, got SHA-256 {sha.hexdigest()} "
                    f"(MD5 {md5.hexdigest()}); the download is corrupted or is not {preset.id}; not cached")
            os.replace(partial, target)
            return target
        except DownloadError:
            raise
        except (OSError, urllib.error.URLError, ConnectionError) as error:  # retry a broken transfer
            partial.unlink(missing_ok=True)
            last_error = error
            if attempt < attempts:
                time.sleep(min(2.0, 0.5 * attempt))
    raise DownloadError(f"could not download {preset.id} from {preset.url} after {attempts} attempt(s): "
                        f"{last_error}. Offline? On a machine with internet run `restransfer weights "
                        f"download {preset.id}` and copy {target} here, or download the file yourself "
                        f"and run `restransfer weights import FILE --as {preset.id}`")


def _from_hub(preset) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise DownloadError("hub weights need huggingface_hub: pip install huggingface_hub") from None
    try:
        path = Path(hf_hub_download(preset.hub_repo, preset.file_name, revision=preset.hub_revision))
    except LocalEntryNotFoundError as error:
        raise DownloadError(
            f"{preset.id}: {preset.file_name} of hub repository {preset.hub_repo} is not in the Hugging Face "
            f"cache and cannot be downloaded ({str(error).splitlines()[0]}). On a machine with internet "
            f"run `restransfer weights download {preset.id}` and copy its Hugging Face cache "
            f"(HF_HUB_CACHE), or `restransfer weights import FILE --as {preset.id}`") from None
    except OSError as error:
        raise DownloadError(f"{preset.id}: could not fetch {preset.source}: {error}") from None
    if preset.sha256:
        _verify(preset, path, f"{preset.source} ({path})")
        return path
    blob = os.path.basename(os.path.realpath(path))
    sha256, _ = file_digests(path)
    if len(blob) == 64 and sha256 != blob:  # LFS blobs are stored under their SHA-256
        raise DownloadError(f"{preset.source} ({path}): the hub cache says SHA-256 {blob}, the file has "
                            f"{sha256}; delete it from the Hugging Face cache and download again")
    return path


def import_file(path, preset=None) -> tuple[object, Path]:
    """Registers a weights file brought by hand: finds its preset by hash (or checks it
    against ``preset``) and copies it to where :func:`fetch` looks. Returns (preset, path)."""
    from restransfer.models import presets as presets_lib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    sha256, md5 = file_digests(path)
    if preset is None:
        found = [p for p in presets_lib.all_presets() if matches(p, sha256, md5)]
        if not found:
            raise DownloadError(f"{path} (SHA-256 {sha256}) is no known preset's file; name the preset "
                                f"with --as BACKBONE.NAME (see `restransfer backbones`)")
        preset = found[0]
    elif (preset.sha256 or preset.md5) and not matches(preset, sha256, md5):
        raise DownloadError(f"{path}: expected {_expected(preset)} for {preset.id}, got SHA-256 {sha256} "
                            f"(MD5 {md5}); not imported")
    target = cached_path(preset)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copyfile(path, partial)
    os.replace(partial, target)
    return preset, target
