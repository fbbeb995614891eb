"""ComfyUI nodes of the SafeRoPE pack (thin: inputs -> saferope_core -> outputs) and the FLUX adapter."""

from . import model_files
from .rotation_nodes import ApplyRiskRotation, LoadSafeRoPEPack

model_files.register_folder()

NODE_CLASS_MAPPINGS = {
    "LoadSafeRoPEPack": LoadSafeRoPEPack,
    "ApplyRiskRotation": ApplyRiskRotation,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadSafeRoPEPack": "Load SafeRoPE Pack",
    "ApplyRiskRotation": "Apply Risk Rotation",
}
