"""The SafeRoPE pack's ComfyUI nodes (V3 schemas: inputs, outputs, tooltips, validation, a short execute) over
saferope_comfy (the model wrapper, model calls, trainers, files) over saferope_core (the method)."""

from ..saferope_comfy.version_check import check_running_comfyui

check_running_comfyui()  # before anything else: an old ComfyUI gets one clear import error

from comfy_api.v0_0_2 import ComfyExtension, io

from ..saferope_comfy import model_files
from .collect_nodes import (
    BuildSubspaces,
    CollectQK,
    LoadStatistics,
    MergeStatistics,
    SafeRoPEPromptSet,
    SaveSafeRoPEPack,
    SaveStatistics,
)
from .redirect_nodes import LoadPromptRedirector, RedirectUnsafePrompts, SavePromptRedirector, TrainPromptRedirector
from .rotation_nodes import ApplyRiskRotation, LoadSafeRoPEPack
from .safety_pack_nodes import ApplySafetyPack, LoadSafetyPack, SaveSafetyPack
from .safety_report import SafetyReport
from .train_nodes import TrainRiskRotations
from .uvr_nodes import CollectUVRAnchors, LoadUVRAnchors, RestrictUnsafeFlow, SaveUVRAnchors
from .visualize_nodes import LRSVisualize
from .wording_nodes import MineWordings

NODES: list[type[io.ComfyNode]] = [
    LoadSafeRoPEPack,
    ApplyRiskRotation,
    LRSVisualize,
    SafetyReport,
    SafeRoPEPromptSet,
    MineWordings,
    CollectQK,
    MergeStatistics,
    BuildSubspaces,
    TrainRiskRotations,
    SaveSafeRoPEPack,
    SaveStatistics,
    LoadStatistics,
    CollectUVRAnchors,
    RestrictUnsafeFlow,
    SaveUVRAnchors,
    LoadUVRAnchors,
    TrainPromptRedirector,
    SavePromptRedirector,
    LoadPromptRedirector,
    RedirectUnsafePrompts,
    SaveSafetyPack,
    LoadSafetyPack,
    ApplySafetyPack,
]


class SafeRoPEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> SafeRoPEExtension:
    model_files.register_folders()  # before the node lists read the folders
    return SafeRoPEExtension()
