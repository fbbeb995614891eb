"""The one file protocol of every file the pack writes (packs, statistics, anchors, redirectors, safety packs,
training checkpoints): safetensors only, JSON metadata under 'saferope' with a kind and a format version, a content
hash over metadata and tensors, written atomically (`write_file`); read back with every problem raised as the
reader's own SafeRoPEError type (`read_safetensors`, then `check_header`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SafeRoPEError

METADATA_KEY = "saferope"


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """sha256 over the metadata (without the hash) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != "content_hash"}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)  # flat: a [H, D, 1] basis may keep a stride that view refuses
        digest.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def hashed(tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    """`metadata` with the content hash of the file it describes."""
    return {**metadata, "content_hash": content_hash(tensors, metadata)}


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write a file of this pack: its metadata stamped with the content hash, written atomically."""
    return save_atomic(path, tensors, hashed(tensors, metadata))


def check_header(
    tensors: dict,
    meta: dict,
    name: str,
    kind: str,
    version: int,
    label: str,
    error: type[SafeRoPEError],
    *,
    hash_required: bool = True,
) -> None:
    """Raise `error` (naming the file `name`) unless the file is a `label` of `kind` and `version` whose content
    hash matches. Without `hash_required`, a file with no hash (written before files were hashed) passes."""
    if meta.get("kind") != kind:
        raise error(f"{name} is not a {label} (metadata kind is {meta.get('kind')!r})")
    if meta.get("format_version") != version:
        raise error(
            f"{name}: format version {meta.get('format_version')!r} is not supported (this node pack reads version "
            f"{version}); update the node pack or rebuild the file"
        )
    check_hash(tensors, meta, name, error, required=hash_required)


def check_hash(tensors: dict, meta: dict, name: str, error: type[SafeRoPEError], *, required: bool = True) -> None:
    """Raise `error` (naming the file `name`) unless the file's content hash matches; without `required`, a file
    with no hash (written before files were hashed) passes."""
    stamp = meta.get("content_hash")
    if stamp is None and not required:
        return
    if not isinstance(stamp, str):
        raise error(f"{name}: metadata field 'content_hash' is missing or not a string")
    if content_hash(tensors, meta) != stamp:
        raise error(f"{name}: content hash mismatch: the file was modified or damaged after it was written")


def save_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write tensors + JSON metadata to a temp file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(
    path: str | os.PathLike, error: type[SafeRoPEError] = SafeRoPEError
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read all tensors and the decoded 'saferope' metadata; `error` (a SafeRoPEError type) for anything
    unreadable."""
    path = Path(path)
    if not path.is_file():
        raise error(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for corrupt input
        raise error(f"{path.name} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    if METADATA_KEY not in raw:
        raise error(f"{path.name} has no '{METADATA_KEY}' metadata: it was not written by this pack")
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: JSON nested too deeply
        raise error(f"{path.name} has malformed metadata JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise error(f"{path.name} metadata is not a JSON object")
    return tensors, metadata


def file_kind(path: str | os.PathLike) -> str | None:
    """The 'kind' a file of this pack says it is (read from its header only), or None for any other file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except Exception:  # not a safetensors file of this pack: it simply is not of any kind we list
        return None
    return metadata.get("kind") if isinstance(metadata, dict) else None
