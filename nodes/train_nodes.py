"""Train Risk Rotations: the second half of Collect & Train."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import torch

from ..saferope_core import PromptSet, SafeRoPEPack, TrainingRecipe, clean_lines
from . import model_files
from .errors import SafeRoPEInputError, require_pack_fits
from .model_calls import latent_shape, load_model
from .training import RotationTrainer, TrainingData

log = logging.getLogger("saferope")


def show_progress_text(node_id, text: str) -> None:
    """Text under the node in the UI, when the server supports it (ComfyUI >= 0.3.4x)."""
    try:
        from server import PromptServer

        server = getattr(PromptServer, "instance", None)
        if node_id is not None and server is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)
    except Exception:  # the UI text is a convenience; training goes on without it
        pass


class TrainRiskRotations:
    """Subspaces + prompts -> trained pack. Only the rotation parameters learn; the model is frozen."""

    DESCRIPTION = ("Trains the rotations of an untrained pack (from Build Subspaces) on this model: unsafe prompts "
                   "are pushed away from what the model would draw, safe prompts (and optional safe images with "
                   "captions) are kept unchanged. Writes a checkpoint to models/saferope_training every "
                   "checkpoint_every steps; with resume on, a stopped run continues where it stopped.")
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("SAFEROPE_PACK", "STRING")
    RETURN_NAMES = ("pack", "log")
    FUNCTION = "train"
    NODE = "Train Risk Rotations"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "subspaces": ("SAFEROPE_PACK",),
                "prompts": ("SAFEROPE_PROMPTS",),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 100000}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1.0, "step": 1e-4}),
                "unlearn_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "preserve_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16}),
                "run_name": ("STRING", {"default": "my_pack", "tooltip": "name of the resumable checkpoint"}),
                "checkpoint_every": ("INT", {"default": 100, "min": 1, "max": 100000}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "continue from run_name's checkpoint if any"}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "recompute blocks in backward: far less memory"}),
            },
            "optional": {
                "vae": ("VAE",),
                "safe_images": ("IMAGE", {"tooltip": "safe images kept intact (noised latents), with captions"}),
                "safe_captions": ("STRING", {"multiline": True, "default": "", "tooltip": "one caption per image"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, subspaces: SafeRoPEPack, prompts: PromptSet, steps, learning_rate, unlearn_weight,
              preserve_weight, seed, width, height, run_name, checkpoint_every, resume, gradient_checkpointing,
              vae=None, safe_images=None, safe_captions="", unique_id=None):
        require_pack_fits(self.NODE, "subspaces", subspaces, model,
                          "Collect statistics and build subspaces on this model")
        if steps < 1:
            raise SafeRoPEInputError(self.NODE, "steps", "must be at least 1")
        if not prompts.unsafe or not prompts.safe:
            raise SafeRoPEInputError(self.NODE, "prompts", "needs unsafe and safe prompts")
        recipe = TrainingRecipe(steps=steps, learning_rate=learning_rate, unlearn_weight=unlearn_weight,
                                preserve_weight=preserve_weight, seed=seed)
        load_model(model)
        data = TrainingData(prompts, latent_shape(model, width, height))
        if safe_images is not None:
            data.safe_latents, data.safe_captions = self._safe_latents(model, vae, safe_images, safe_captions)
        checkpoint = os.path.join(model_files.output_dir(model_files.TRAINING_FOLDER),
                                  f"{os.path.basename(run_name.strip()) or 'run'}.safetensors")
        progress = comfy.utils.ProgressBar(steps)
        history = []

        def on_step(step, kind, dev, loss):
            progress.update_absolute(step, steps)
            history.append((step, kind, dev))
            if step % 10 == 0 or step == steps:
                text = f"step {step}/{steps}  {kind}  deviation {dev:.4g}  loss {loss:.4g}"
                show_progress_text(unique_id, text)
                log.info("Train Risk Rotations: %s", text)

        trainer = RotationTrainer(model, clip, subspaces, data, recipe, gradient_checkpointing)
        try:
            pack = trainer.train(checkpoint, resume, checkpoint_every, on_step,
                                 comfy.model_management.throw_exception_if_processing_interrupted)
        except ValueError as err:
            if "checkpoint" in str(err) or "trained on" in str(err) or " used " in str(err):
                raise SafeRoPEInputError(self.NODE, "run_name", str(err),
                                         "Use a new run_name or turn resume off") from None
            raise
        pack.name = "+".join(pack.concepts)
        return (pack, summarize(history, checkpoint))

    def _safe_latents(self, model, vae, images: torch.Tensor, captions: str):
        if vae is None:
            raise SafeRoPEInputError(self.NODE, "vae", "safe_images need a VAE to encode them", "Connect the FLUX VAE")
        lines = clean_lines(captions)
        if len(lines) != images.shape[0]:
            raise SafeRoPEInputError(self.NODE, "safe_captions", f"{len(lines)} captions for {images.shape[0]} images",
                                     "Write one caption per image, one per line")
        latents = vae.encode(images[:, :, :, :3])
        return model.model.process_latent_in(latents).float().cpu(), lines


def summarize(history, checkpoint: str) -> str:
    """Mean relative deviation per kind over the first and the last fifth of that kind's steps."""
    if not history:
        return f"already trained (checkpoint {checkpoint})"

    def ends(kind):
        values = [d for _, k, d in history if k == kind]
        if not values:
            return float("nan"), float("nan")
        n = max(len(values) // 5, 1)
        return sum(values[:n]) / n, sum(values[-n:]) / n

    (u0, u1), (s0, s1) = ends("unsafe"), ends("safe")
    return (f"{history[-1][0]} steps; relative deviation on unsafe prompts {u0:.4g} -> {u1:.4g}, on safe prompts "
            f"{s0:.4g} -> {s1:.4g}; checkpoint {checkpoint}")
