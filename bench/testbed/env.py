"""ComfyUI and the pack for the testbed: bench.comfyui_env's import_comfyui / import_pack (CPU, real checkout)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_saferope"  # the name comfyui_env.import_pack() gives this repository


def comfy_and_pack():
    """Import ComfyUI on the CPU ($COMFYUI_PATH, ~/ComfyUI, ...) and this repository as a custom-node package;
    returns the pack module (`pack.nodes.*`, `pack.saferope_core`)."""
    from .. import comfyui_env

    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    comfyui_env.import_comfyui()
    return comfyui_env.import_pack(PACK_NAME)
