"""UVR: Collect UVR Anchors, Restrict Unsafe Flow and Save / Load UVR Anchors (training-free, text-to-image and Kontext
editing).

Detection runs at one single block during the start-up steps (sigma >= sigma_start): image-token attention
outputs (before the output projection) are scored against the anchors, per sample and per CFG branch, into a patch
mask. Restriction, in every block after the detection block of the same call and, with the mask of the previous
step, in every block before it (as the authors' code, whose mask is kept from step to step):
- text-to-image: the flagged tokens' attention output is replaced by noise of the same scale (the authors' 0.001 *
  out + 0.999 * noise at strength 1), so the concept cannot be assembled there;
- Kontext editing: attention to the reference-image tokens that map (through their RoPE ids) onto flagged output
  patches is scaled down (x0.2 core, x0.4 ring at strength 1) and attention to text and output-image keys slightly
  up (x1.1), as an additive per-key logit bias passed as the attention mask: the fast attention path is kept and
  no [L x L] attention map is ever built.
Outside the start-up steps, and when nothing is flagged, attention runs untouched.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..saferope_comfy.editors import AttentionOutputCollector
from ..saferope_comfy.flux_adapter import with_qk_editor
from ..saferope_comfy.model_calls import latent_shape, run_prompts
from ..saferope_comfy.model_files import ANCHORS_FOLDER, STATS_FOLDER
from ..saferope_core import AnchorsError, PromptSet, QKStatistics
from ..saferope_core.uvr import ANCHORS_KIND, UVRAnchors, build_anchors
from .common import (
    Anchors,
    Prompts,
    checked,
    parse_sigmas,
    require_flux,
    seed_input,
    sigmas_input,
    size_inputs,
    validation,
)
from .errors import SafeRoPEInputError
from .file_nodes import LoadFileNode, SaveFileNode
from .guards import restricted

CATEGORY = "SafeRoPE/UVR"
ANCHOR_FOLDERS = (ANCHORS_FOLDER, STATS_FOLDER)  # anchors saved before they had their own folder still load
CALIBRATED = -1.0  # Restrict Unsafe Flow's threshold value that means "the anchors' calibrated threshold"


def detection_block_name(node: str, shape, index: int) -> str:
    if not 0 <= index < shape.single_blocks:
        raise SafeRoPEInputError(
            node,
            "detection_block",
            f"single block {index} does not exist (the model has {shape.single_blocks})",
            "The paper uses single block 10 of FLUX's 38",
        )
    return f"single.{index}"


class CollectUVRAnchors(io.ComfyNode):
    NODE = "Collect UVR Anchors"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CollectUVRAnchors",
            display_name=cls.NODE,
            category=CATEGORY,
            description="Runs the model on unsafe and safe prompts in the start-up steps and records, at the "
            "detection block, the per-head attention outputs of image tokens; reduces them to a few "
            "anchor directions per head and calibrates a detection threshold. No training: seconds to "
            "minutes.",
            inputs=[
                io.Model.Input("model", tooltip="The model Restrict Unsafe Flow will guard"),
                io.Clip.Input("clip", tooltip="That model's text encoder"),
                Prompts.Input("prompts", tooltip="From SafeRoPE Prompt Set: the concept and safe prompts"),
                io.Int.Input(
                    "detection_block",
                    default=10,
                    min=0,
                    max=255,
                    tooltip="The single block whose attention is read (the paper: 10 of FLUX's 38)",
                ),
                sigmas_input("1.0, 0.95, 0.9", "Start-up noise levels the model is run at, comma separated"),
                *size_inputs("the model is run at"),
                io.Int.Input(
                    "anchors_per_head",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Directions kept per head to recognise the concept",
                ),
                seed_input("Seed of the noise the model is run on"),
            ],
            outputs=[
                Anchors.Output(
                    "anchors", display_name="anchors", tooltip="For Restrict Unsafe Flow or Save UVR Anchors"
                ),
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="Prompts used, the detection block and the calibrated threshold",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, sigmas=None):
        return validation(cls.NODE, "sigmas", sigmas, lambda text: parse_sigmas(text, cls.NODE))

    @classmethod
    @checked
    def execute(
        cls, model, clip, prompts: PromptSet, detection_block, sigmas, width, height, anchors_per_head, seed
    ) -> io.NodeOutput:
        shape = require_flux(cls.NODE, model)
        block = detection_block_name(cls.NODE, shape, detection_block)
        sigma_list = parse_sigmas(sigmas, cls.NODE)
        stats = QKStatistics(shape, 4096, seed, [prompts.concept])
        collector = AttentionOutputCollector(stats, block)
        patched = with_qk_editor(model, collector)
        jobs = [("unsafe", p.text) for p in prompts.unsafe] + [("safe", t) for t in prompts.safe]

        def aim(index, prompt, noise) -> bool:
            collector.group = jobs[index][0]
            return True

        size = latent_shape(patched, width, height)
        run_prompts(patched, clip, [text for _, text in jobs], sigma_list, size, seed, aim)
        collector.group = None
        try:
            anchors = build_anchors(stats, block, anchors_per_head, min(sigma_list))
        except AnchorsError as err:
            raise SafeRoPEInputError(cls.NODE, "prompts", str(err)) from None
        report = (
            f"{len(prompts.unsafe)} unsafe and {len(prompts.safe)} safe prompts at {block}; "
            f"{anchors_per_head} anchors per head; calibrated threshold {anchors.threshold:.3f}"
        )
        return io.NodeOutput(anchors, report)


class RestrictUnsafeFlow(io.ComfyNode):
    NODE = "Restrict Unsafe Flow"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RestrictUnsafeFlow",
            display_name=cls.NODE,
            category=CATEGORY,
            description="Training-free guard (UVR): in the start-up steps it finds the image patches that carry the "
            "anchors' concept and restricts their flow, so the concept cannot be assembled; for editing "
            "(Kontext, FLUX.2 references) it also turns attention away from the matching parts of the "
            "reference image. Later steps, and images with nothing flagged, run untouched. The input "
            "model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model the anchors were collected on (or a patched copy)"),
                Anchors.Input("anchors", tooltip="From Load UVR Anchors or Collect UVR Anchors"),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="How much of the flagged flow is removed: 1 as the paper, 0 turns it off",
                ),
                io.Float.Input(
                    "threshold",
                    default=-1.0,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Patch score above which a patch counts as unsafe; -1 = the anchors' calibrated threshold",
                ),
                io.Float.Input(
                    "sigma_start",
                    default=0.85,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Act in the start-up steps, where sigma >= this (1 = pure noise)",
                ),
                io.Int.Input(
                    "detection_block",
                    default=-1,
                    min=-1,
                    max=255,
                    tooltip="-1 = the block the anchors were collected at",
                ),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the model; sample with it instead of the input")],
        )

    @classmethod
    @checked
    def execute(cls, model, anchors: UVRAnchors, strength, threshold, sigma_start, detection_block) -> io.NodeOutput:
        cut = anchors.threshold if threshold == CALIBRATED else float(threshold)
        return io.NodeOutput(
            restricted(cls.NODE, "anchors", model, anchors, float(strength), cut, float(sigma_start), detection_block)
        )


class SaveUVRAnchors(SaveFileNode):
    NODE, NODE_ID, CATEGORY, FOLDER = "Save UVR Anchors", "SaveUVRAnchors", CATEGORY, ANCHORS_FOLDER
    DESCRIPTION = "Writes anchors to models/saferope_anchors/<name>.safetensors, where Load UVR Anchors finds them."
    CONTENT = Anchors.Input("anchors", tooltip="From Collect UVR Anchors")
    DEFAULT_NAME, WHAT = "uvr_anchors", "anchors"

    @classmethod
    @checked
    def execute(cls, anchors: UVRAnchors, name, overwrite) -> io.NodeOutput:
        return cls.save(anchors, name, overwrite)


class LoadUVRAnchors(LoadFileNode):
    NODE, NODE_ID, CATEGORY = "Load UVR Anchors", "LoadUVRAnchors", CATEGORY
    DESCRIPTION = (
        "Loads anchors saved by Save UVR Anchors (from models/saferope_anchors; anchors saved in "
        "models/saferope_statistics by earlier versions are listed too)."
    )
    KIND, FOLDERS = ANCHORS_KIND, ANCHOR_FOLDERS
    NAME_TOOLTIP = "An anchors file in ComfyUI/models/saferope_anchors"
    OUTPUTS = [Anchors.Output(tooltip="For Restrict Unsafe Flow")]
    NONE_CHOSEN = (
        "no anchors file chosen",
        "Make anchors with Collect UVR Anchors -> Save UVR Anchors (they go to models/saferope_anchors)",
    )
    ERROR, REMAKE = AnchorsError, "Collect and save the anchors again"

    @classmethod
    def read(cls, path):
        return UVRAnchors.load(path)
