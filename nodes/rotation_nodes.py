"""Load SafeRoPE Pack and Apply Risk Rotation."""

from __future__ import annotations

import os

from ..saferope_core import SafeRoPEPack, SafeRoPEPackError, load_pack
from . import model_files
from .errors import SafeRoPEInputError, require_pack_fits
from .flux_adapter import with_qk_editor

NO_FILE = "none"
TOKEN_CHOICES = {"both": ("txt", "img"), "text": ("txt",), "image": ("img",)}


class RiskRotation:
    """q/k editor: rotates the pack's selected heads for the chosen token types at a user strength."""

    def __init__(self, pack: SafeRoPEPack, strength: float, tokens: tuple[str, ...]):
        self.pack, self.strength, self.tokens = pack, strength, tokens
        self._by_device: dict[str, SafeRoPEPack] = {}

    def pack_on(self, device) -> SafeRoPEPack:
        key = str(device)
        if key not in self._by_device:
            self._by_device[key] = self.pack.to(device)
        return self._by_device[key]

    def edit_qk(self, call, block, tokens, q, k):
        if tokens not in self.tokens or block not in self.pack.blocks:
            return q, k
        pack = self.pack_on(q.device)
        return (pack.rotate(q, block, "q", tokens, self.strength),
                pack.rotate(k, block, "k", tokens, self.strength))


class LoadSafeRoPEPack:
    """Load a pack file from models/saferope (or download it from the Hugging Face Hub once)."""

    DESCRIPTION = ("Loads a SafeRoPE pack (.safetensors) from models/saferope. To fetch a published pack, set "
                   "hf_repo_id and hf_filename: it is downloaded into models/saferope only if not there yet.")
    CATEGORY = "SafeRoPE"
    RETURN_TYPES = ("SAFEROPE_PACK", "STRING")
    RETURN_NAMES = ("pack", "info")
    FUNCTION = "load"
    NODE = "Load SafeRoPE Pack"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"pack_name": ([NO_FILE, *model_files.pack_files()], {"tooltip": "a file in models/saferope"})},
            "optional": {
                "hf_repo_id": ("STRING", {"default": "", "tooltip": "Hugging Face repo id, e.g. user/saferope-packs"}),
                "hf_filename": ("STRING", {"default": "", "tooltip": "file inside that repo, e.g. nudity.safetensors"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, pack_name, hf_repo_id="", hf_filename=""):
        try:
            st = os.stat(cls._path(pack_name, hf_repo_id, hf_filename, download=False))
            return f"{st.st_mtime_ns}:{st.st_size}"
        except Exception:
            return f"{pack_name}|{hf_repo_id}|{hf_filename}"

    @classmethod
    def _path(cls, pack_name, hf_repo_id, hf_filename, download=True) -> str:
        repo, filename = hf_repo_id.strip(), hf_filename.strip()
        if repo or filename:
            if not (repo and filename):
                raise SafeRoPEInputError(cls.NODE, "hf_filename" if repo else "hf_repo_id",
                                         "a Hub download needs both a repo id and a file name",
                                         "Fill in both, or clear both to use pack_name")
            if not filename.endswith(".safetensors"):
                raise SafeRoPEInputError(cls.NODE, "hf_filename", f"'{filename}' is not a .safetensors file",
                                         "Packs are safetensors only")
            local = os.path.join(model_files.output_dir(), os.path.basename(filename))
            return model_files.download_from_hub(repo, filename) if download else local
        if pack_name == NO_FILE:
            raise SafeRoPEInputError(cls.NODE, "pack_name", "no pack chosen",
                                     "Put a pack in models/saferope (or build one with the Collect & Train nodes), "
                                     "or set hf_repo_id and hf_filename")
        return model_files.resolve(pack_name)

    def load(self, pack_name, hf_repo_id="", hf_filename=""):
        path = self._path(pack_name, hf_repo_id, hf_filename)
        try:
            pack = load_pack(path)
        except SafeRoPEPackError as err:
            raise SafeRoPEInputError(self.NODE, "pack_name", str(err),
                                     "Rebuild or re-download the pack") from None
        info = pack.describe()
        return {"ui": {"text": [info]}, "result": (pack, info)}


class ApplyRiskRotation:
    """MODEL + pack -> a patched clone of MODEL that rotates risky queries and keys."""

    DESCRIPTION = ("Patches FLUX attention so that tokens of the pack's concept are rotated inside its unsafe "
                   "subspaces and the concept cannot form. The input model is not changed. Chain several Apply "
                   "nodes to stack packs.")
    CATEGORY = "SafeRoPE"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    NODE = "Apply Risk Rotation"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "pack": ("SAFEROPE_PACK",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "scales every rotation; 0 turns the pack off"}),
                "apply_to": (list(TOKEN_CHOICES), {"default": "both",
                                                    "tooltip": "rotate text tokens, image tokens or both"}),
            }
        }

    def apply(self, model, pack, strength, apply_to):
        require_pack_fits(self.NODE, "pack", pack, model,
                          "Use a pack built for this model (FLUX.1 dev/schnell/Kontext share one shape)")
        return (with_qk_editor(model, RiskRotation(pack, float(strength), TOKEN_CHOICES[apply_to])),)
