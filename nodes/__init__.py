"""ComfyUI nodes of the SafeRoPE pack (thin: inputs -> saferope_core -> outputs) and the FLUX adapter."""

from .version_check import check_running_comfyui

check_running_comfyui()  # before anything else: an old ComfyUI gets one clear import error

from . import model_files
from .collect_nodes import (
    BuildSubspaces,
    CollectQK,
    LoadStatistics,
    MergeStatistics,
    SafeRoPEPromptSet,
    SaveSafeRoPEPack,
    SaveStatistics,
)
from .rotation_nodes import ApplyRiskRotation, LoadSafeRoPEPack
from .safety_report import SafetyReport
from .train_nodes import TrainRiskRotations
from .uvr_nodes import CollectUVRAnchors, LoadUVRAnchors, RestrictUnsafeFlow, SaveUVRAnchors
from .visualize_nodes import LRSVisualize

model_files.register_folders()

_NODES = [
    LoadSafeRoPEPack, ApplyRiskRotation, LRSVisualize, SafetyReport,
    SafeRoPEPromptSet, CollectQK, MergeStatistics, BuildSubspaces, TrainRiskRotations,
    SaveSafeRoPEPack, SaveStatistics, LoadStatistics,
    CollectUVRAnchors, RestrictUnsafeFlow, SaveUVRAnchors, LoadUVRAnchors,
]

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.NODE for cls in _NODES}
