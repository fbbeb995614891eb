"""Prompt redirection (SafeRedir for the FLUX family): Train Prompt Redirector, Save / Load Prompt Redirector and
Redirect Unsafe Prompts. The mechanism is in prompt_redirect.py, the model in saferope_core/redirector.py."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..saferope_comfy.model_calls import latent_shape, load_model
from ..saferope_comfy.model_files import REDIRECTOR_FOLDER
from ..saferope_comfy.prompt_redirect import (
    RedirectorRecipe,
    RedirectorTrainer,
    redirector_config,
)
from ..saferope_core import PromptSet
from ..saferope_core.redirector import REDIRECTOR_KIND, PromptRedirector, RedirectorError
from .common import (
    Prompts,
    Redirector,
    checked,
    require_flux,
    seed_input,
    size_inputs,
)
from .errors import SafeRoPEInputError
from .file_nodes import LoadFileNode, SaveFileNode
from .guards import redirected
from .training_run import NodeRun, learning_rate_input, run_inputs, validate_run_name

log = logging.getLogger("saferope")


class TrainPromptRedirector(io.ComfyNode):
    NODE = "Train Prompt Redirector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainPromptRedirector",
            display_name=cls.NODE,
            category="SafeRoPE/Collect & Train",
            description="Trains a prompt redirector (SafeRedir) on this model from a Prompt Set with anchors: a "
            "detector that reads the prompt, the current latent and the noise level, and a token-wise edit of "
            "the text conditioning that makes unsafe prompts draw their anchor while safe prompts pass "
            "unchanged. The model is frozen. Checkpoints to models/saferope_training; resume continues a run.",
            inputs=[
                io.Model.Input("model", tooltip="The model the redirector will guard"),
                io.Clip.Input("clip", tooltip="That model's text encoder"),
                Prompts.Input("prompts", tooltip="From SafeRoPE Prompt Set (its anchors are what gets drawn)"),
                io.Int.Input("steps", default=400, min=1, max=100000, tooltip="Training steps"),
                learning_rate_input(
                    1e-3, "AdamW learning rate at the first step; it falls along a half cosine to 0 at the last"
                ),
                seed_input("Seed of the redirector's start, the prompts and the noise of every step"),
                *size_inputs("training runs at"),
                *run_inputs("redirector"),
            ],
            outputs=[
                Redirector.Output(tooltip="For Save Prompt Redirector or Redirect Unsafe Prompts"),
                io.String.Output("log", display_name="log", tooltip="How the redirect gap and safe edits moved"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, run_name=None):
        return validate_run_name(cls.NODE, run_name)

    @classmethod
    @checked
    def execute(
        cls,
        model,
        clip,
        prompts: PromptSet,
        steps,
        learning_rate,
        seed,
        width,
        height,
        run_name,
        checkpoint_every,
        resume,
        gradient_checkpointing,
    ) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        run = NodeRun.named(cls.NODE, node_id, run_name, steps, ("redirect gap (1 = base, 0 = the anchor)", "edit"))
        if not prompts.unsafe or not prompts.safe:
            raise SafeRoPEInputError(cls.NODE, "prompts", "needs unsafe and safe prompts")
        require_flux(cls.NODE, model)
        config = redirector_config(model)
        load_model(model)
        recipe = RedirectorRecipe(steps=steps, learning_rate=learning_rate, seed=seed)
        shape = latent_shape(model, width, height)
        trainer = RedirectorTrainer(model, clip, prompts, shape, recipe, config, gradient_checkpointing)
        return io.NodeOutput(run.train(trainer, resume, checkpoint_every), run.summary())


class SavePromptRedirector(SaveFileNode):
    NODE, NODE_ID, CATEGORY = "Save Prompt Redirector", "SavePromptRedirector", "SafeRoPE/Collect & Train"
    FOLDER = REDIRECTOR_FOLDER
    DESCRIPTION = f"Writes a redirector to models/{REDIRECTOR_FOLDER}/<name>.safetensors."
    CONTENT = Redirector.Input("redirector", tooltip="From Train Prompt Redirector")
    DEFAULT_NAME, WHAT = "redirector", "redirector"

    @classmethod
    def write(cls, redirector: PromptRedirector, path: str) -> None:
        redirector.save(path, redirector.concept, redirector.recipe)

    @classmethod
    @checked
    def execute(cls, redirector: PromptRedirector, name, overwrite) -> io.NodeOutput:
        return cls.save(redirector, name, overwrite)


class LoadPromptRedirector(LoadFileNode):
    NODE, NODE_ID = "Load Prompt Redirector", "LoadPromptRedirector"
    DESCRIPTION = f"Loads a redirector saved by Save Prompt Redirector (from models/{REDIRECTOR_FOLDER})."
    KIND, FOLDERS = REDIRECTOR_KIND, (REDIRECTOR_FOLDER,)
    NAME_TOOLTIP = f"A redirector file in ComfyUI/models/{REDIRECTOR_FOLDER}"
    OUTPUTS = [Redirector.Output(tooltip="For Redirect Unsafe Prompts")]
    NONE_CHOSEN = (
        "no redirector file chosen",
        f"Train one with Train Prompt Redirector -> Save Prompt Redirector (models/{REDIRECTOR_FOLDER})",
    )
    ERROR, REMAKE = RedirectorError, "Train and save the redirector again"

    @classmethod
    def read(cls, path):
        return PromptRedirector.load(path)[0]


class RedirectUnsafePrompts(io.ComfyNode):
    NODE = "Redirect Unsafe Prompts"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RedirectUnsafePrompts",
            display_name=cls.NODE,
            category="SafeRoPE",
            description="Prompt redirection (SafeRedir): at every step, per image and per CFG branch, the "
            "redirector's detector reads the prompt, the latent and the noise level; flagged samples get "
            "their text conditioning moved towards the safe meaning (only the unsafe tokens), the others run "
            "untouched. A flagged sample stays redirected for `cooldown` steps. The input model is not "
            "changed; stacks with Apply Risk Rotation and Restrict Unsafe Flow in any order.",
            inputs=[
                io.Model.Input("model", tooltip="The model the redirector was trained on (or a patched copy)"),
                Redirector.Input("redirector", tooltip="From Load Prompt Redirector or Train Prompt Redirector"),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="How far flagged tokens move: 1 as trained, 0 turns it off",
                ),
                io.Float.Input(
                    "threshold",
                    default=0.0,
                    min=-20.0,
                    max=20.0,
                    step=0.1,
                    tooltip="Detector logit above which a sample counts as unsafe (0 = probability 0.5)",
                ),
                io.Int.Input("cooldown", default=3, min=0, max=1000, tooltip="Steps a flagged sample stays redirected"),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the model; sample with it instead of the input")],
        )

    @classmethod
    @checked
    def execute(cls, model, redirector: PromptRedirector, strength, threshold, cooldown) -> io.NodeOutput:
        return io.NodeOutput(
            redirected(cls.NODE, "redirector", model, redirector, float(strength), float(threshold), int(cooldown))
        )
