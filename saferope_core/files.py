"""Atomic safetensors writing and guarded reading shared by every saved intermediate."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SafeRoPEError

METADATA_KEY = "saferope"


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
