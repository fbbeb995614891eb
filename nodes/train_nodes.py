"""Train Risk Rotations: the second half of Collect & Train."""

from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io

from ..saferope_comfy.model_calls import latent_shape, load_model
from ..saferope_comfy.training import RotationTrainer, TrainingData
from ..saferope_core import PromptSet, SafeRoPEPack, TrainingRecipe, clean_lines
from .common import (
    Pack,
    Prompts,
    checked,
    require_pack_fits,
    seed_input,
    size_inputs,
)
from .errors import SafeRoPEInputError
from .training_run import NodeRun, learning_rate_input, run_inputs, validate_run_name

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
                learning_rate_input(1e-2, "With steps, how strong the pack becomes (see the README on tuning)"),
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
                *run_inputs("my_pack"),
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
        return validate_run_name(cls.NODE, run_name)

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
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        run = NodeRun.named(cls.NODE, node_id, run_name, steps, ("relative deviation", "relative deviation"))
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
        trainer = RotationTrainer(model, clip, subspaces, data, recipe, gradient_checkpointing)
        pack = run.train(trainer, resume, checkpoint_every)
        pack.name = "+".join(pack.concepts)
        return io.NodeOutput(pack, f"{run.summary()}\n{trainer.report.text()}")

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
