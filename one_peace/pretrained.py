"""Official ONE-PEACE checkpoints by name: ``one_peace.load("one-peace-4b")``; ``python -m one_peace.pretrained``
lists them. Checkpoint folders on the Hugging Face Hub: ``one_peace.load("hf-hub:org/name[@revision]")``.

A name downloads its official file (a progress bar; an interrupted download resumes with an HTTP range request) and
the official GPT-2 BPE files into the cache (``$ONE_PEACE_CACHE``, default ``~/.cache/one-peace``), checks its
SHA-256, converts it once to our folder format (``<cache>/pretrained/<name>/model``) and deletes the download; later
loads read that folder (memory-mapped safetensors) without the network.

Integrity: the official hashes are not published, so the hash seen at the first download is recorded
(``<cache>/pretrained/<name>/source.json``) and a later download of the same name must match it; a user pins one
with ``sha256=`` (or ``ONE_PEACE_SHA256_<NAME>``). A mismatch is refused naming both hashes. ``ONE_PEACE_MIRROR``
replaces the official host (a mirror, or a local server in tests). Offline (``HF_HUB_OFFLINE=1`` or
``ONE_PEACE_OFFLINE=1``) a cached name loads and a missing one fails with one line naming the URL to fetch and the
file to put it in.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OSS = "https://one-peace-shanghai.oss-accelerate.aliyuncs.com/"
BPE_BASE = "https://raw.githubusercontent.com/OFA-Sys/ONE-PEACE/main/one_peace/utils/BPE/"
BPE_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Pretrained:
    """One official checkpoint: where it is (relative to the official host) and what it is for."""

    path: str
    description: str


#: the official checkpoints of the ONE-PEACE repository's checkpoints.md that hold the shared encoder
PRETRAINED: dict[str, Pretrained] = {
    "one-peace-4b": Pretrained("one-peace.pt", "the pretrained 4B model: text, image, audio (retrieval, any task)"),
    "one-peace-4b-coco": Pretrained(
        "one_peace_checkpoints/finetune_coco.pt", "fine-tuned for COCO image-text retrieval"
    ),
    "one-peace-4b-flickr": Pretrained(
        "one_peace_checkpoints/finetune_flickr.pt", "fine-tuned for Flickr30K image-text retrieval"
    ),
    "one-peace-4b-audio-text": Pretrained(
        "one_peace_checkpoints/finetune_al_retrieval.pt", "fine-tuned for audio-text retrieval (AudioCaps, Clotho)"
    ),
}


class PretrainedError(RuntimeError):
    """A pretrained name that cannot be had: unknown, offline and not cached, unreachable, or corrupted."""


def cache_dir() -> Path:
    """``$ONE_PEACE_CACHE``, else ``~/.cache/one-peace``."""
    return Path(os.environ.get("ONE_PEACE_CACHE") or Path.home() / ".cache" / "one-peace")


def offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE`` or ``ONE_PEACE_OFFLINE`` set to 1 / true / yes)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "ONE_PEACE_OFFLINE"))


def url_of(relative: str, base: str = OSS) -> str:
    """The URL of an official file, on ``$ONE_PEACE_MIRROR`` when set."""
    mirror = os.environ.get("ONE_PEACE_MIRROR")
    return (mirror.rstrip("/") + "/" if mirror else base) + relative


def resolve(name: str, sha256: str | None = None, progress: bool = True) -> Path:
    """The cached folder of pretrained ``name``, downloaded, verified and converted on first use.

    Raises:
        PretrainedError: an unknown name (listing the known ones), offline without the cache, a download that
            fails, or a file whose SHA-256 is not the pinned or recorded one (naming both).
    """
    if name not in PRETRAINED:
        raise PretrainedError(f"unknown pretrained name {name!r}; known: {', '.join(PRETRAINED)}")
    entry = PRETRAINED[name]
    home = cache_dir() / "pretrained" / name
    folder = home / "model"
    if (folder / "config.json").is_file():
        return folder
    url = url_of(entry.path)
    download = home / Path(entry.path).name
    if offline():
        raise PretrainedError(
            f"{name} is not in the cache and downloads are off (HF_HUB_OFFLINE / ONE_PEACE_OFFLINE): fetch {url} "
            f"to {download} (and {', '.join(BPE_FILES)} from {url_of('', BPE_BASE)} to {home / 'bpe'}), then load "
            "it again"
        )
    home.mkdir(parents=True, exist_ok=True)
    record = home / "source.json"
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    pinned = sha256 or os.environ.get(f"ONE_PEACE_SHA256_{name.upper().replace('-', '_')}")
    expected = pinned or recorded.get("sha256")
    seen = fetch(url, download, progress=progress, desc=name)
    if expected and seen != expected:
        download.unlink(missing_ok=True)
        raise PretrainedError(
            f"{name}: the file from {url} has SHA-256 {seen}, expected {expected} "
            f"({'pinned' if pinned else 'recorded at the first download in ' + str(record)}); it was deleted"
        )
    bpe = home / "bpe"
    bpe.mkdir(exist_ok=True)
    for f in BPE_FILES:
        if not (bpe / f).is_file():
            fetch(url_of(f, BPE_BASE), bpe / f, progress=False)
    from one_peace.convert import convert

    convert(download, folder, bpe_dir=bpe)
    _write_json(record, {"name": name, "url": url, "sha256": seen, "size": download.stat().st_size})
    download.unlink()
    return folder


def resolve_hub(spec: str) -> Path:
    """The local snapshot folder of ``hf-hub:org/name[@revision]`` (a checkpoint folder of ours on the Hugging Face
    Hub), through ``huggingface_hub``'s cache (``HF_HUB_CACHE``); offline (``HF_HUB_OFFLINE`` /
    ``ONE_PEACE_OFFLINE``) only the cache is read. The folder is then loaded through the checkpoint-folder reader
    (which lets a snapshot's files link into the cache's ``blobs/``).

    Raises:
        PretrainedError: a malformed name, or a repository that is neither cached (offline) nor reachable.
    """
    repo, _, revision = spec.removeprefix("hf-hub:").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PretrainedError(f"{spec!r}: expected hf-hub:<org>/<name>[@<revision>]")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - tokenizers depends on it
        raise PretrainedError("hf-hub: names need the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        folder = snapshot_download(
            repo_id=repo,
            revision=revision or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline(),
            allow_patterns=["*.json", "*.safetensors", "*.bpe", "*.txt", "README.md"],
        )
    except Exception as exc:  # huggingface_hub's offline, 404 and network errors: one line naming the repo
        where = "in the cache (downloads are off)" if offline() else "on the Hub"
        raise PretrainedError(f"{spec}: not found {where}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return Path(folder)


def fetch(url: str, dest: Path, progress: bool = True, desc: str | None = None, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` (through ``dest.partial``, resumed with a range request when a partial file is
    there) and return its SHA-256.

    Raises:
        PretrainedError: an HTTP or network error, naming the URL.
    """
    from tqdm import tqdm

    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    have = 0
    if partial.is_file():  # the part already here is hashed again: the digest covers the whole file
        with open(partial, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
                have += len(block)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already whole
            response = None
        else:
            raise PretrainedError(f"downloading {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PretrainedError(f"downloading {url}: {exc} (set ONE_PEACE_OFFLINE=1 to use the cache only)") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if not resumed:  # the server sent the whole file: start over
                digest, have = hashlib.sha256(), 0
            total = response.headers.get("Content-Length")
            size = (int(total) + have) if total is not None and total.isdigit() else None
            bar = tqdm(
                total=size, initial=have, unit="B", unit_scale=True, desc=desc or dest.name, disable=not progress
            )
            try:
                with open(partial, "ab" if resumed else "wb") as out:
                    while True:
                        try:
                            block = response.read(CHUNK)
                        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
                            raise PretrainedError(
                                f"downloading {url}: the connection broke after {have:,} bytes ({exc}); run it again "
                                "to resume"
                            ) from None
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        have += len(block)
                        bar.update(len(block))
            finally:
                bar.close()
            if size is not None and have < size:
                raise PretrainedError(
                    f"downloading {url}: the connection closed after {have:,} of {size:,} bytes; run it again to resume"
                )
    os.replace(partial, dest)
    return digest.hexdigest()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m one_peace.pretrained``: the names, what each is for, and whether it is cached."""
    del argv
    root = cache_dir() / "pretrained"
    print(f"official ONE-PEACE checkpoints by name (cache: {root}; one_peace.load(NAME) downloads and converts once)")
    for name, entry in PRETRAINED.items():
        cached = (root / name / "model" / "config.json").is_file()
        print(f"  {name:<26} {'cached' if cached else 'not cached':<11} {entry.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
