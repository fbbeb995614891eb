"""Train Risk Rotations: the second half of Collect & Train."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import torch
from comfy_api.v0_0_2 import io

from ..saferope_comfy import model_files
from ..saferope_comfy.model_calls import latent_shape, load_model
from ..saferope_comfy.training import RotationTrainer, TrainingData
from ..saferope_core import CheckpointError, PromptSet, SafeRoPEPack, TrainingRecipe, clean_lines
from .common import (
    Pack,
    Prompts,
    checked,
    file_stem,
    require_pack_fits,
    seed_input,
    show_progress_text,
    size_inputs,
    validation,
)
from .errors import SafeRoPEInputError

log = logging.getLogger("saferope")
OBJECTIVES = ("redirect", "deviate")
DEFAULT_OBJECTIVE = "redirect"


class TrainRiskRotations(io.ComfyNode):
    NODE = "Train Risk Rotations"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainRiskRotations",
            display_name=cls.NODE,
            category="SafeRoPE/Collect & Train",
            description="Trains the rotations of an untrained pack (from Build Subspaces) on this model: unsafe "
            "prompts are trained to draw their anchor (the Prompt Set's safe counterpart) instead, or with the "
            "'deviate' objective pushed away from what the model would draw; safe prompts (and optional safe "
            "images with captions) are kept unchanged; only the rotations learn, the model is frozen. Ends "
            "with a check on held-out prompts. "
            "Writes a checkpoint to models/saferope_training every checkpoint_every steps; with resume "
            "on, a stopped run continues where it stopped.",
            inputs=[
                io.Model.Input("model", tooltip="The model the subspaces were collected on"),
                io.Clip.Input("clip", tooltip="That model's text encoder"),
                Pack.Input("subspaces", tooltip="From Build Subspaces (or a pack to train further)"),
                Prompts.Input("prompts", tooltip="The prompt set the statistics were collected from"),
                io.Int.Input(
                    "steps",
                    default=1000,
                    min=1,
                    max=100000,
                    tooltip="Training steps (runs of 10 unsafe then 10 safe, as the authors' code)",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-2,
                    min=1e-6,
                    max=1.0,
                    step=1e-4,
                    tooltip="With steps, how strong the pack becomes (see the README on tuning)",
                ),
                io.Float.Input(
                    "unlearn_weight",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Weight of the unsafe prompts' term (drawing their anchor, or moving away)",
                ),
                io.Float.Input(
                    "preserve_weight",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Weight of keeping safe prompts unchanged",
                ),
                seed_input("Seed of the rotations' start, the prompts and the noise of every step"),
                *size_inputs("training runs at"),
                io.String.Input(
                    "run_name",
                    default="my_pack",
                    tooltip="Name of the resumable checkpoint in models/saferope_training",
                ),
                io.Int.Input(
                    "checkpoint_every",
                    default=100,
                    min=1,
                    max=100000,
                    tooltip="Write the checkpoint every this many steps",
                ),
                io.Boolean.Input("resume", default=True, tooltip="Continue from run_name's checkpoint if there is one"),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute blocks in backward: far less memory, a little slower, same result",
                ),
                io.Vae.Input("vae", optional=True, tooltip="Only with safe_images: encodes them"),
                io.Image.Input(
                    "safe_images",
                    optional=True,
                    tooltip="Optional safe images kept intact (their noised latents), with captions",
                ),
                io.String.Input(
                    "safe_captions",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip="One caption per safe image, one per line",
                ),
                io.Combo.Input(
                    "objective",
                    options=list(OBJECTIVES),
                    default=DEFAULT_OBJECTIVE,
                    optional=True,
                    tooltip="redirect: unsafe prompts are trained to draw their anchor (the Prompt Set's safe "
                    "counterpart) instead; deviate: unsafe prompts are pushed away from what the model draws, with no "
                    "end point (the paper's objective; it tends to blank the subject)",
                ),
            ],
            outputs=[
                Pack.Output(
                    "pack",
                    display_name="pack",
                    tooltip="The trained pack, for Save SafeRoPE Pack or Apply Risk Rotation",
                ),
                io.String.Output(
                    "log",
                    display_name="log",
                    tooltip="How far unsafe and safe prompts moved, first and last steps, and the held-out check: "
                    "does the pack erase unsafe prompts it never trained on, and keep the nearest safe ones",
                ),
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
        subspaces: SafeRoPEPack,
        prompts: PromptSet,
        steps,
        learning_rate,
        unlearn_weight,
        preserve_weight,
        seed,
        width,
        height,
        run_name,
        checkpoint_every,
        resume,
        gradient_checkpointing,
        vae=None,
        safe_images=None,
        safe_captions="",
        objective=None,
    ) -> io.NodeOutput:
        run_file = f"{file_stem(cls.NODE, run_name, 'run_name')}.safetensors"  # checked before any work starts
        require_pack_fits(
            cls.NODE, "subspaces", subspaces, model, "Collect statistics and build subspaces on this model"
        )
        if steps < 1:
            raise SafeRoPEInputError(cls.NODE, "steps", "must be at least 1")
        if not prompts.unsafe or not prompts.safe:
            raise SafeRoPEInputError(cls.NODE, "prompts", "needs unsafe and safe prompts")
        recipe = TrainingRecipe(
            steps=steps,
            learning_rate=learning_rate,
            unlearn_weight=unlearn_weight,
            preserve_weight=preserve_weight,
            seed=seed,
            objective=objective or DEFAULT_OBJECTIVE,
        )
        load_model(model)
        data = TrainingData(prompts, latent_shape(model, width, height))
        if safe_images is not None:
            data.safe_latents, data.safe_captions = cls.safe_latents(model, vae, safe_images, safe_captions)
        checkpoint = os.path.join(model_files.output_dir(model_files.TRAINING_FOLDER), run_file)
        progress = comfy.utils.ProgressBar(steps)
        history = []
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def on_step(step, kind, dev, loss):
            progress.update_absolute(step, steps)
            history.append((step, kind, dev))
            if step % 10 == 0 or step == steps:
                text = f"step {step}/{steps}  {kind}  deviation {dev:.4g}  loss {loss:.4g}"
                show_progress_text(node_id, text)
                log.info("Train Risk Rotations: %s", text)

        trainer = RotationTrainer(model, clip, subspaces, data, recipe, gradient_checkpointing)
        try:
            pack = trainer.train(
                checkpoint,
                resume,
                checkpoint_every,
                on_step,
                comfy.model_management.throw_exception_if_processing_interrupted,
            )
        except CheckpointError as err:
            raise SafeRoPEInputError(cls.NODE, "run_name", str(err), "Use a new run_name or turn resume off") from None
        pack.name = "+".join(pack.concepts)
        return io.NodeOutput(pack, f"{summarize(history, checkpoint)}\n{trainer.report.text()}")

    @classmethod
    def safe_latents(cls, model, vae, images: torch.Tensor, captions: str):
        if vae is None:
            raise SafeRoPEInputError(
                cls.NODE, "vae", "safe_images need a VAE to encode them", "Connect the model's VAE"
            )
        lines = clean_lines(captions)
        if len(lines) != images.shape[0]:
            raise SafeRoPEInputError(
                cls.NODE,
                "safe_captions",
                f"{len(lines)} captions for {images.shape[0]} images",
                "Write one caption per image, one per line",
            )
        latents = vae.encode(images[:, :, :, :3])
        return model.model.process_latent_in(latents).float().cpu(), lines


def summarize(history, checkpoint: str) -> str:
    """Mean relative deviation per kind over the first and the last fifth of that kind's steps."""
    if not history:
        return f"already trained (checkpoint {checkpoint})"

    def ends(kind) -> str:
        values = [d for _, k, d in history if k == kind]
        if not values:
            return "- (no step of this kind yet)"
        n = max(len(values) // 5, 1)
        return f"{sum(values[:n]) / n:.4g} -> {sum(values[-n:]) / n:.4g}"

    return (
        f"{history[-1][0]} steps; relative deviation on unsafe prompts {ends('unsafe')}, on safe prompts "
        f"{ends('safe')}; checkpoint {checkpoint}"
    )
