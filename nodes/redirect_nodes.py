"""Prompt redirection (SafeRedir for the FLUX family): Train Prompt Redirector, Save / Load Prompt Redirector and
Redirect Unsafe Prompts. The mechanism is in prompt_redirect.py, the model in saferope_core/redirector.py."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..saferope_comfy import model_files
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
    file_stem,
    name_inputs,
    require_flux,
    save_node_output,
    seed_input,
    size_inputs,
    target_path,
    validation,
)
from .errors import SafeRoPEInputError
from .guards import redirected
from .training_run import NodeRun

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
                io.Float.Input(
                    "learning_rate",
                    default=1e-3,
                    min=1e-6,
                    max=1.0,
                    step=1e-4,
                    tooltip="AdamW learning rate at the first step; it falls along a half cosine to 0 at the last",
                ),
                seed_input("Seed of the redirector's start, the prompts and the noise of every step"),
                *size_inputs("training runs at"),
                io.String.Input(
                    "run_name", default="redirector", tooltip="Name of the checkpoint in models/saferope_training"
                ),
                io.Int.Input(
                    "checkpoint_every", default=100, min=1, max=100000, tooltip="Write the checkpoint this often"
                ),
                io.Boolean.Input("resume", default=True, tooltip="Continue from run_name's checkpoint if there is one"),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute blocks in backward: far less memory, a little slower, same result",
                ),
            ],
            outputs=[
                Redirector.Output(tooltip="For Save Prompt Redirector or Redirect Unsafe Prompts"),
                io.String.Output("log", display_name="log", tooltip="How the redirect gap and safe edits moved"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, run_name=None):
        return validation(cls.NODE, "run_name", run_name, lambda text: file_stem(cls.NODE, text, "run_name"))

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
        redirector = run.train(trainer, resume, checkpoint_every)
        redirector.concept = prompts.concept
        redirector.recipe = {**recipe.to_dict(), "steps": max(steps, trainer.steps_done)}
        return io.NodeOutput(redirector, run.summary())


class SavePromptRedirector(io.ComfyNode):
    NODE = "Save Prompt Redirector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SavePromptRedirector",
            display_name=cls.NODE,
            category="SafeRoPE/Collect & Train",
            description=f"Writes a redirector to models/{REDIRECTOR_FOLDER}/<name>.safetensors.",
            inputs=[
                Redirector.Input("redirector", tooltip="From Train Prompt Redirector"),
                *name_inputs("redirector", "redirector"),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="Where the redirector was written")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name=None):
        return validation(cls.NODE, "name", name, lambda text: file_stem(cls.NODE, text))

    @classmethod
    @checked
    def execute(cls, redirector: PromptRedirector, name, overwrite) -> io.NodeOutput:
        path = target_path(cls.NODE, model_files.output_dir(REDIRECTOR_FOLDER), name, overwrite)
        redirector.save(path, redirector.concept, redirector.recipe)
        return save_node_output(path)


class LoadPromptRedirector(io.ComfyNode):
    NODE = "Load Prompt Redirector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadPromptRedirector",
            display_name=cls.NODE,
            category="SafeRoPE",
            description=f"Loads a redirector saved by Save Prompt Redirector (from models/{REDIRECTOR_FOLDER}).",
            inputs=[
                io.Combo.Input(
                    "name",
                    options=[model_files.NO_FILE, *model_files.files_of_kind(REDIRECTOR_KIND, REDIRECTOR_FOLDER)],
                    tooltip=f"A redirector file in ComfyUI/models/{REDIRECTOR_FOLDER}",
                )
            ],
            outputs=[Redirector.Output(tooltip="For Redirect Unsafe Prompts")],
        )

    @classmethod
    def fingerprint_inputs(cls, name):
        """Reload when the file changes, not only when the name does."""
        return model_files.fingerprint_in(name, REDIRECTOR_FOLDER)

    @classmethod
    @checked
    def execute(cls, name) -> io.NodeOutput:
        if name == model_files.NO_FILE:
            raise SafeRoPEInputError(
                cls.NODE,
                "name",
                "no redirector file chosen",
                f"Train one with Train Prompt Redirector -> Save Prompt Redirector (models/{REDIRECTOR_FOLDER})",
            )
        try:
            redirector, _ = PromptRedirector.load(model_files.resolve_in(name, REDIRECTOR_FOLDER))
        except RedirectorError as err:
            raise SafeRoPEInputError(cls.NODE, "name", str(err), "Train and save the redirector again") from None
        return io.NodeOutput(redirector)


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
