"""What the training nodes share around the one trainer (saferope_comfy.training.run_training): their run inputs
(learning rate, run name, checkpoints, resume, gradient checkpointing), ComfyUI's progress bar, a line under the node
every 10 steps, cancel from the queue, a checkpoint of another run as an error on `run_name`, and the summary of the
run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io

from ..saferope_comfy import model_files
from ..saferope_core import CheckpointError
from .common import file_stem, show_progress_text, validation
from .errors import SafeRoPEInputError

log = logging.getLogger("saferope")


def learning_rate_input(default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input("learning_rate", default=default, min=1e-6, max=1.0, step=1e-4, tooltip=tooltip)


def run_inputs(default_run_name: str) -> list[io.Input]:
    """run_name, checkpoint_every, resume and gradient_checkpointing of a training node."""
    return [
        io.String.Input(
            "run_name",
            default=default_run_name,
            tooltip="Name of the resumable checkpoint in models/saferope_training",
        ),
        io.Int.Input("checkpoint_every", default=100, min=1, max=100000, tooltip="Write the checkpoint this often"),
        io.Boolean.Input("resume", default=True, tooltip="Continue from run_name's checkpoint if there is one"),
        io.Boolean.Input(
            "gradient_checkpointing",
            default=True,
            tooltip="Recompute blocks in backward: far less memory, a little slower, same result",
        ),
    ]


def validate_run_name(node: str, run_name) -> bool | str:
    """For a training node's validate_inputs."""
    return validation(node, "run_name", run_name, lambda text: file_stem(node, text, "run_name"))


@dataclass
class NodeRun:
    """One training run of a node: its checkpoint file in models/saferope_training, and what it logged."""

    node: str
    node_id: str | None
    steps: int
    checkpoint: str
    figures: tuple[str, str]  # what the logged figure is on unsafe and on safe steps
    history: list[tuple[int, str, float]] = field(default_factory=list)  # (step, kind, figure)

    @classmethod
    def named(cls, node: str, node_id, run_name: str, steps: int, figures: tuple[str, str]) -> NodeRun:
        """Checks `run_name` before any work starts."""
        run_file = f"{file_stem(node, run_name, 'run_name')}.safetensors"
        checkpoint = os.path.join(model_files.output_dir(model_files.TRAINING_FOLDER), run_file)
        return cls(node, node_id, steps, checkpoint, figures)

    def train(self, trainer, resume: bool, checkpoint_every: int):
        """`trainer.train(...)` with progress, the log line and cancel; its result."""
        progress = comfy.utils.ProgressBar(self.steps)

        def on_step(step, kind, figure, loss):
            progress.update_absolute(step, self.steps)
            self.history.append((step, kind, figure))
            if step % 10 == 0 or step == self.steps:
                name = self.figures[0] if kind == "unsafe" else self.figures[1]
                text = f"step {step}/{self.steps}  {kind}  {name} {figure:.4g}  loss {loss:.4g}"
                show_progress_text(self.node_id, text)
                log.info("%s: %s", self.node, text)

        stop = comfy.model_management.throw_exception_if_processing_interrupted
        try:
            return trainer.train(self.checkpoint, resume, checkpoint_every, on_step, stop)
        except CheckpointError as err:
            raise SafeRoPEInputError(self.node, "run_name", str(err), "Use a new run_name or turn resume off") from None

    def summary(self) -> str:
        """The logged figure per kind over the first and the last fifth of that kind's steps."""
        if not self.history:
            return f"already trained (checkpoint {self.checkpoint})"

        def ends(kind) -> str:
            values = [figure for _, k, figure in self.history if k == kind]
            if not values:
                return "- (no step of this kind yet)"
            n = max(len(values) // 5, 1)
            return f"{sum(values[:n]) / n:.4g} -> {sum(values[-n:]) / n:.4g}"

        unsafe, safe = self.figures
        safe = "" if safe == unsafe else f"{safe} "
        first, last = self.history[0][0], self.history[-1][0]
        resumed = f" (resumed after step {first - 1})" if first > 1 else ""
        return (
            f"{last} steps{resumed}; {unsafe} on unsafe prompts {ends('unsafe')}, {safe}on safe prompts "
            f"{ends('safe')}; checkpoint {self.checkpoint}"
        )
