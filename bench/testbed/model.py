"""The testbed's base model: ComfyUI's own FLUX classes at a small size, conditioned on MiniLM.

The committed weights live in bench/testbed/model/ (safetensors, float16, config and training recipe in the
metadata) with a JSON beside them holding the sha256; `python -m bench.testbed train` reproduces them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .text_encoder import DIM

MODEL_DIR = Path(__file__).resolve().parent / "model"
MODEL_FILE = MODEL_DIR / "tiny_world_flux.safetensors"
MODEL_INFO = MODEL_DIR / "tiny_world_flux.json"
# the same recipe trained on the world with defaults (grey when a caption names no colour, solid when it names no
# pattern: `python -m bench.testbed train --defaults`); erase and benchmark take it with --world defaults
DEFAULTS_MODEL_FILE = MODEL_DIR / "tiny_world_flux_defaults.safetensors"
WORLDS = {"plain": MODEL_FILE, "defaults": DEFAULTS_MODEL_FILE}  # --world of erase / benchmark -> base model
CPU = torch.device("cpu")


def unet_config(hidden: int = 128, heads: int = 4, depth: int = 2, depth_single: int = 2) -> dict:
    """unet_config of a small FLUX (what comfy.model_detection would find): 16 latent channels, patch 2,
    MiniLM-sized context and pooled vector, no guidance embedding (cfg 1 sampling, like FLUX schnell/dev)."""
    head_dim = hidden // heads
    axis = head_dim * 7 // 32 * 2  # FLUX's 16/56/56 split of a 128-dim head, scaled
    return {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "vec_in_dim": DIM,
        "context_in_dim": DIM,
        "hidden_size": hidden,
        "mlp_ratio": 4.0,
        "num_heads": heads,
        "depth": depth,
        "depth_single_blocks": depth_single,
        "axes_dim": [head_dim - 2 * axis, axis, axis],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": False,
    }


def for_this_comfyui(config: dict) -> dict:
    """`config` with the fields this ComfyUI's FluxParams requires: 0.8.0 added txt_ids_dims (FLUX.1: none), which
    0.3.64 rejects."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**config, "txt_ids_dims": []} if "txt_ids_dims" in fields else dict(config)


def build(config: dict):
    """A ModelPatcher over comfy.supported_models.Flux(config) on the CPU in float32 (weights uninitialised)."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(for_this_comfyui(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(diffusion_model: torch.nn.Module, config: dict, info: dict, path: Path = MODEL_FILE) -> str:
    """Write the weights (float16) with config + info in the metadata, and the sha256 JSON beside; returns sha."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in diffusion_model.state_dict().items()}
    save_file(
        tensors,
        str(path),
        metadata={"config": json.dumps(config, sort_keys=True), "info": json.dumps(info, sort_keys=True)},
    )
    sha = file_sha256(path)
    info_path = path.with_suffix(".json")
    info_path.write_text(
        json.dumps(
            {"file": path.name, "sha256": sha, "bytes": path.stat().st_size, "config": config, **info},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return sha


def load(path: Path = MODEL_FILE, check_sha: bool = True):
    """The committed base model as a ComfyUI ModelPatcher (float32 on the CPU); verifies the sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m bench.testbed train` to build it")
    if check_sha and path.with_suffix(".json").is_file():
        expected = json.loads(path.with_suffix(".json").read_text())["sha256"]
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(f"{path.name}: sha256 {actual} does not match {expected} in {path.with_suffix('.json')}")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    patcher = build(config)
    state = with_norm_names_of(state, patcher.model.diffusion_model.state_dict().keys())
    missing, unexpected = patcher.model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path.name} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return patcher


def with_norm_names_of(state: dict, names) -> dict:
    """`state` with its norm parameters named as this ComfyUI names them: FLUX's QK norms hold `scale` up to
    ComfyUI 0.8 and are torch RMSNorm modules holding `weight` from 0.33 (same values)."""
    names = set(names)
    renamed = {}
    for key, value in state.items():
        stem, _, last = key.rpartition(".")
        other = f"{stem}.{ {'scale': 'weight', 'weight': 'scale'}.get(last, last) }"
        renamed[other if key not in names and other in names else key] = value
    return renamed


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Training init (ComfyUI leaves weights torch.empty): norm weights 1 (whatever ComfyUI calls them), linear
    weights N(0, 1/fan_in), biases 0, modulation and final projection zero (adaLN-zero, as DiT)."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in module.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            elif ".lin." in name and "modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
