"""Save Safety Pack, Load Safety Pack and Apply Safety Pack: every guard of a concept in one file, applied by one
node. Save Safety Pack, given the model and text encoder, runs the guard check (which guards to apply together) and
records its choice in the file."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..saferope_comfy import model_files
from ..saferope_comfy.guard_check import check_guards
from ..saferope_core.safety_pack import SAFETY_PACK_KIND, SafetyPack, SafetyPackError, load_safety_pack
from .common import (
    Anchors,
    Pack,
    Prompts,
    Redirector,
    SafetyPackType,
    checked,
    file_stem,
    name_inputs,
    require_flux,
    save_node_output,
    size_inputs,
    target_path,
    validation,
)
from .errors import SafeRoPEInputError
from .file_nodes import LoadFileNode
from .guards import redirected, restricted, rotated

# How Apply Safety Pack runs each guard at strength 1 (the separate nodes' defaults)
REDIRECT_THRESHOLD, REDIRECT_COOLDOWN = 0.0, 3
UVR_SIGMA_START = 0.85
# Apply Safety Pack's guards input: the guard check's choice (the default), or every guard the pack carries
GUARD_CHOICES = ("as checked", "every guard")
# The guard check: sampling steps, and unsafe and safe prompts of the Prompt Set it samples
CHECK_STEPS, CHECK_PROMPTS = 10, 16


def apply_guards(node: str, name: str, model, safety_pack: SafetyPack, strength: float, guards) -> object:
    """A clone of `model` with the pack's `guards` applied at `strength`: redirect, then rotate, then restrict;
    `name` is the node's input an error names."""
    s = float(strength)
    if "redirector" in guards and safety_pack.redirector is not None:
        model = redirected(node, name, model, safety_pack.redirector, s, REDIRECT_THRESHOLD, REDIRECT_COOLDOWN)
    if "rotation" in guards and safety_pack.rotation is not None:
        model = rotated(node, name, model, safety_pack.rotation, s, ("txt", "img"))
    if "uvr" in guards and safety_pack.anchors is not None:
        anchors = safety_pack.anchors
        model = restricted(node, name, model, anchors, min(s, 1.0), anchors.threshold, UVR_SIGMA_START)
    return model


class SaveSafetyPack(io.ComfyNode):
    NODE = "Save Safety Pack"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveSafetyPack",
            display_name=cls.NODE,
            category="SafeRoPE/Collect & Train",
            description="Writes every guard built for one concept into one file in models/saferope: the trained "
            "rotations, the UVR anchors and the prompt redirector (any of them; at least one), with the "
            "wordings of the Prompt Set. With the model and text encoder connected it first runs the guard check: "
            "it samples some of the Prompt Set's prompts with every combination of the guards and records the one "
            "that moves unsafe prompts furthest to their safe version while changing safe prompts least; Apply "
            "Safety Pack applies that combination (without the check: all of them).",
            inputs=[
                Prompts.Input("prompts", tooltip="The Prompt Set the guards were built from (concept and wordings)"),
                Pack.Input("pack", optional=True, tooltip="Trained rotations, from Train Risk Rotations"),
                Anchors.Input("anchors", optional=True, tooltip="From Collect UVR Anchors"),
                Redirector.Input("redirector", optional=True, tooltip="From Train Prompt Redirector"),
                *name_inputs("nudity_safety_pack", "safety pack"),
                io.Model.Input(
                    "model", optional=True, tooltip="The model the guards were built on: runs the guard check"
                ),
                io.Clip.Input("clip", optional=True, tooltip="Its text encoder (for the guard check)"),
                *size_inputs("of the guard check's samples, as the guards were built", optional=True),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="Where the safety pack was written")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name=None, **_):
        return validation(cls.NODE, "name", name, lambda text: file_stem(cls.NODE, text))

    @classmethod
    @checked
    def execute(
        cls,
        prompts,
        name,
        overwrite,
        pack=None,
        anchors=None,
        redirector=None,
        model=None,
        clip=None,
        width=512,
        height=512,
    ) -> io.NodeOutput:
        shape = next((part.shape for part in (pack, anchors) if part is not None), None)
        if shape is None and redirector is None:
            raise SafeRoPEInputError(cls.NODE, "pack", "no guard is connected", "Connect a pack, anchors or both")
        if shape is None:
            raise SafeRoPEInputError(
                cls.NODE, "pack", "a redirector alone does not say the model's shape", "Connect the pack or anchors too"
            )
        wordings = {"named": sorted({u.subject for u in prompts.unsafe} - set(prompts.mined))}
        if prompts.mined:
            wordings["mined"] = list(prompts.mined)
        try:
            safety = SafetyPack(
                shape,
                prompts.concept,
                pack,
                anchors,
                redirector,
                {"concept": redirector.concept, "recipe": redirector.recipe} if redirector is not None else {},
                wordings,
                file_stem(cls.NODE, name),
            )
        except SafetyPackError as err:
            raise SafeRoPEInputError(cls.NODE, "pack", str(err), "Build every guard on the same model") from None
        path = target_path(cls.NODE, model_files.output_dir(), name, overwrite)
        checked_guards = model is not None or clip is not None
        report = cls.guard_check(safety, prompts, model, clip, (width, height)) if checked_guards else ""
        safety.save(path)
        return save_node_output(path, report)

    @classmethod
    def guard_check(cls, safety: SafetyPack, prompts, model, clip, size) -> str:
        """Run the guard check and record its choice in `safety`; the check's report."""
        if model is None or clip is None:
            missing, connected = ("model", "clip") if model is None else ("clip", "model")
            raise SafeRoPEInputError(
                cls.NODE,
                missing,
                "the guard check needs both",
                f"Connect {missing} too, or disconnect {connected} to save without the check",
            )
        try:
            safety.check_model(require_flux(cls.NODE, model))
        except SafetyPackError as err:
            raise SafeRoPEInputError(
                cls.NODE, "model", str(err), "Connect the model the guards were built on"
            ) from None
        guards = safety.guards()
        if len(guards) < 2:
            return "guard check: one guard, nothing to choose (not run)"
        check = check_guards(
            model,
            clip,
            prompts,
            guards,
            lambda combo: apply_guards(cls.NODE, "model", model, safety, 1.0, combo),
            size,
            CHECK_STEPS,
            CHECK_PROMPTS,
        )
        safety.applies, safety.guard_check = list(check.chosen()), check.to_dict()
        return check.text()


class LoadSafetyPack(LoadFileNode):
    NODE, NODE_ID = "Load Safety Pack", "LoadSafetyPack"
    DESCRIPTION = (
        "Loads a safety pack (every guard of a concept in one file) from models/saferope, checked as a whole: one "
        "content hash, one model, each guard by its own checks."
    )
    KIND, FOLDERS = SAFETY_PACK_KIND, (model_files.FOLDER,)
    NAME_TOOLTIP = "A safety pack in ComfyUI/models/saferope (Save Safety Pack writes them)"
    OUTPUTS = [
        SafetyPackType.Output("safety_pack", display_name="safety_pack", tooltip="For Apply Safety Pack"),
        io.String.Output(
            "info", display_name="info", tooltip="Concept, guards, model, and the wordings it was built with"
        ),
    ]
    NONE_CHOSEN = ("no safety pack chosen", "Build one with the Collect & Train nodes -> Save Safety Pack")
    ERROR, REMAKE = SafetyPackError, "Build and save the safety pack again"

    @classmethod
    def read(cls, path):
        return load_safety_pack(path)

    @classmethod
    def output(cls, safety: SafetyPack) -> io.NodeOutput:
        info = safety.describe()
        return io.NodeOutput(safety, info, ui={"text": [info]})


class ApplySafetyPack(io.ComfyNode):
    NODE = "Apply Safety Pack"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplySafetyPack",
            display_name=cls.NODE,
            category="SafeRoPE",
            description="Applies the guards a safety pack carries (those its guard check chose, when it was built "
            "with one, unless guards is set to every guard), at one strength: the prompt redirector (redraws the "
            "concept as its safe counterpart), SafeRoPE's rotations (the concept cannot form in attention) and UVR "
            "(restricts the flow of patches that still carry it, also from reference images). The input model is "
            "not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model the pack was built for (or a patched copy)"),
                SafetyPackType.Input("safety_pack", tooltip="From Load Safety Pack"),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="Every guard's strength: 1 as built, 0 turns the pack off (UVR stops at 1)",
                ),
                io.Boolean.Input(
                    "redirect",
                    default=True,
                    tooltip="Prompt redirector: flagged samples get their concept words moved to the safe meaning, so "
                    "the safe version is drawn (when the pack has one and its guard check kept it)",
                ),
                io.Boolean.Input(
                    "rotate",
                    default=True,
                    tooltip="SafeRoPE rotations: risky queries and keys are turned inside the concept's subspace, so "
                    "attention cannot assemble it, on any wording (when the pack has them and its guard check kept "
                    "them)",
                ),
                io.Boolean.Input(
                    "restrict",
                    default=True,
                    tooltip="UVR: in the first steps, image patches that carry the concept have their flow "
                    "restricted, from reference images too (when the pack has anchors and its guard check kept them)",
                ),
                io.Combo.Input(
                    "guards",
                    options=list(GUARD_CHOICES),
                    default=GUARD_CHOICES[0],
                    optional=True,
                    tooltip="as checked: the guards the pack's guard check chose (all of them when it was saved "
                    "without the check). every guard: all the pack carries; reaches more wordings nobody mined, but "
                    "prompts without the concept may change too. The switches above still turn each one off",
                ),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the model; sample with it instead of the input")],
        )

    @classmethod
    @checked
    def execute(
        cls, model, safety_pack: SafetyPack, strength, redirect, rotate, restrict, guards=GUARD_CHOICES[0]
    ) -> io.NodeOutput:
        try:
            safety_pack.check_model(require_flux(cls.NODE, model))
        except SafetyPackError as err:
            raise SafeRoPEInputError(cls.NODE, "safety_pack", str(err), "Use one built for this model") from None
        if float(strength) == 0:
            return io.NodeOutput(model)
        switched_on = {g for g, on in (("redirector", redirect), ("rotation", rotate), ("uvr", restrict)) if on}
        offered = safety_pack.applied_guards() if guards == GUARD_CHOICES[0] else safety_pack.guards()
        applied = [g for g in offered if g in switched_on]
        return io.NodeOutput(apply_guards(cls.NODE, "safety_pack", model, safety_pack, strength, applied))
