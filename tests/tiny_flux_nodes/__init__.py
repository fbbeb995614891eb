"""Test-only ComfyUI nodes: a tiny random FLUX, word-hash text conditioning and a tiny random FLUX text encoder
(ComfyUI's own FLUX CLIP classes with the real T5 and CLIP-L tokenizers), so a headless server graph needs no model
file. The builders live in bench/comfyui_env.py (shared with in-process tests and the benchmarks)."""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[2])  # resolve(): the server sees this folder through a symlink
if _REPO not in sys.path:
    sys.path.append(_REPO)

from bench import comfyui_env  # noqa: E402


class TinyFluxLoader:
    """A random FLUX (2 double + 2 single blocks, 4 heads of 16) built from ComfyUI's own classes."""

    CATEGORY = "testing/tiny flux"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        kinds = [k for k in comfyui_env.ALL_KINDS if comfyui_env.kind_supported(k)]
        return {"required": {"kind": (kinds,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def load(self, kind, seed):
        return (comfyui_env.tiny_flux(kind, seed=seed),)


class TinyFluxConditioning:
    """Text -> CONDITIONING for the tiny FLUX: token i is a fixed random vector of word i, no text encoder."""

    CATEGORY = "testing/tiny flux"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "default": ""}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    def encode(self, text, seed):
        return (comfyui_env.conditioning(text, seed),)


class TinyFluxClipLoader:
    """A tiny random text encoder whose outputs fit the Tiny FLUX Loader's model of the same kind: FLUX.1's T5-XXL +
    CLIP-L, Chroma's T5-XXL, or (FLUX.2, Ovis-Image) Ovis-Image's Qwen3 with its chat template."""

    CATEGORY = "testing/tiny flux"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        kinds = [k for k in comfyui_env.ALL_KINDS if comfyui_env.kind_supported(k)]
        return {
            "required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})},
            "optional": {"kind": (kinds, {"default": "dev"})},
        }

    def load(self, seed, kind="dev"):
        return (comfyui_env.tiny_clip(kind, seed=seed),)


NODE_CLASS_MAPPINGS = {
    "TinyFluxLoader": TinyFluxLoader,
    "TinyFluxConditioning": TinyFluxConditioning,
    "TinyFluxClipLoader": TinyFluxClipLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TinyFluxLoader": "Tiny FLUX Loader (test)",
    "TinyFluxConditioning": "Tiny FLUX Conditioning (test)",
    "TinyFluxClipLoader": "Tiny FLUX CLIP Loader (test)",
}
