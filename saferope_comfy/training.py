"""Training on a frozen FLUX inside a ComfyUI node: the one trainer (`run_training`, a strategy per objective) and
the rotations' objective (`RotationTrainer`; the prompt redirector's is in prompt_redirect.py).

- Only the rotation parameters W (text and image, per selected head) are leaf tensors with gradients; the model's
  own parameters are frozen for the duration (requires_grad restored afterwards).
- ComfyUI runs nodes under torch.inference_mode(); training runs under inference_mode(False) + enable_grad.
- The stock FLUX blocks update their residual stream in place (`txt += ...`, `x += ...`) after layer norms saved
  that same tensor for backward. A block-replace patch (ComfyUI's "dit" patches_replace, chained with any patch
  already there) clones, through saved_tensors_hooks, only tensors that share storage with the block's inputs,
  so no weight is ever copied; optional gradient checkpointing recomputes each block in backward.
- Each step's randomness comes from (seed, step), so a run resumed from a checkpoint (W + Adam state, written to a
  temp file and renamed into place) reaches the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from dataclasses import dataclass

import comfy.ldm.flux.math
import comfy.model_management
import torch
import torch.utils.checkpoint

from ..saferope_core import (
    CheckpointError,
    PromptSet,
    SafeRoPEPack,
    TrainingRecipe,
    batch_kind,
    deviation,
    learning_rate_at,
    one_step_clean,
    preserve_loss,
    redirect_gap,
    redirect_loss,
    unlearn_loss,
)
from ..saferope_core.files import check_hash, content_hash, read_safetensors, write_file
from ..saferope_core.held_out import HeldOutReport, held_out_report, held_out_split
from .editors import RiskObserver, RiskRotation
from .flux_adapter import call_options, rehooked, with_qk_editor
from .model_calls import EncodedPrompt, encode_prompt, velocity

CHECKPOINT_KIND = "saferope.training_checkpoint"


class BackwardSafeBlock:
    """dit block-replace patch that makes a stock block differentiable despite its in-place residual updates, and
    optionally recomputes it in backward (gradient checkpointing) instead of keeping its activations.

    In-place updates (`txt += ...`, `x += ...`) overwrite tensors a layer norm saved for backward: a
    saved_tensors_hook clones, when they are saved, only the tensors that share storage with the block's inputs.
    Checkpointing is torch's reentrant kind: the forward runs without a graph, the block's inputs (copies) are kept,
    and backward runs the block again with gradients, so only those inputs stay in memory. Running again needs the
    block as it was: ComfyUI's block call (`original_block`) reads its block and options late, so their values are
    kept from the forward; where q/k edits are QK-norm hooks (ComfyUI < 0.33), which live only during the model
    call, the editors' hooks are put on this block again for the recompute (flux_adapter.rehooked).
    """

    def __init__(self, inner=None, checkpoint: bool = False, name: str = "", model=None):
        self.inner, self.checkpoint, self.name, self.model = inner, checkpoint, name, model

    def _run(self, block_args, extra):
        storages = {t.untyped_storage().data_ptr() for k in ("img", "txt") if torch.is_tensor(t := block_args.get(k))}

        def pack(t):
            return t.clone() if t.untyped_storage().data_ptr() in storages else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return self.inner(block_args, extra) if self.inner else extra["original_block"](block_args)

    def __call__(self, args, extra):
        if not (self.checkpoint and torch.is_grad_enabled()):
            return self._run(args, extra)
        options = dict(args.get("transformer_options") or {})  # ComfyUI changes block_index in place later
        kept = {**args, "transformer_options": options}
        streams = [k for k in ("img", "txt") if torch.is_tensor(args.get(k))]
        closure = _closure_values(extra["original_block"])

        def run(_needs_grad, *inputs):  # first without gradients, then again in backward, with them
            block_args = {**kept, **{k: t.clone() for k, t in zip(streams, inputs, strict=True)}}
            again = torch.is_grad_enabled()
            with (
                _closure_as(extra["original_block"], closure),
                rehooked(options if again else {}, self.model, self.name),
            ):
                out = self._run(block_args, extra)
            return tuple(out[k] for k in streams)

        needs_grad = torch.ones((), requires_grad=True)  # a backward also where no input needs one (first block)
        inputs = [args[k].clone() for k in streams]  # the forward updates its inputs in place
        outputs = torch.utils.checkpoint.checkpoint(run, needs_grad, *inputs, use_reentrant=True)
        return dict(zip(streams, outputs, strict=True))


def _closure_values(fn) -> list:
    return [cell.cell_contents for cell in fn.__closure__ or ()]


@contextlib.contextmanager
def _closure_as(fn, values: list):
    """`fn`'s closure variables set to `values` for the duration (then back to what they are now)."""
    cells = fn.__closure__ or ()
    now = _closure_values(fn)
    for cell, value in zip(cells, values, strict=True):
        cell.cell_contents = value
    try:
        yield
    finally:
        for cell, value in zip(cells, now, strict=True):
            cell.cell_contents = value


class _RopeWithBackward(torch.autograd.Function):
    """FLUX's RoPE op with a backward: it rotates each pair of channels by a 2x2 matrix, so the gradient is the same
    op with the transposed matrices. ComfyUI >= 0.8 applies RoPE through comfy-kitchen's op, which has none."""

    @staticmethod
    def forward(ctx, rope, q, k, freqs):
        ctx.rope = rope
        ctx.save_for_backward(freqs)
        return rope(q, k, freqs)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        (freqs,) = ctx.saved_tensors
        dq, dk = ctx.rope(grad_q.contiguous(), grad_k.contiguous(), freqs.transpose(-1, -2))
        return None, dq, dk, None


@contextlib.contextmanager
def differentiable_rope():
    """FLUX's attention gets a RoPE with a backward for the duration, put back in `finally` (after an error or an
    interrupt too). Where ComfyUI has its training switch (`comfy.model_management.in_training`, ComfyUI >= 0.33:
    plain-torch RoPE with autograd), that switch is turned on; else ComfyUI's `apply_rope` (comfy-kitchen's op on
    0.8, which has no backward) is wrapped in an autograd function whose forward is the same op (same outputs)."""
    management = comfy.model_management
    if hasattr(management, "in_training"):
        previous = management.in_training
        management.in_training = True
        try:
            yield
        finally:
            management.in_training = previous
        return
    module = comfy.ldm.flux.math
    original = module.apply_rope

    def apply_rope(q, k, freqs):
        return _RopeWithBackward.apply(original, q, k, freqs)

    module.apply_rope = apply_rope
    try:
        yield
    finally:
        module.apply_rope = original


def training_options(patcher, checkpointing: bool) -> dict:
    """transformer_options for a differentiable call: the patcher's own, with every block wrapped."""
    options = call_options(patcher)
    model = patcher.model.diffusion_model
    replace = options.setdefault("patches_replace", {}).setdefault("dit", {})
    for kind, blocks in (("double_block", model.double_blocks), ("single_block", model.single_blocks)):
        for i in range(len(blocks)):
            name = f"{kind.removesuffix('_block')}.{i}"
            replace[(kind, i)] = BackwardSafeBlock(replace.get((kind, i)), checkpointing, name, model)
    return options


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Switch requires_grad off on every parameter for the duration (restored after): only W may get gradients."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            with torch.inference_mode(p.is_inference()):  # inference tensors may only change flags inside it
                p.requires_grad_(True)


def make_autograd_safe(model: torch.nn.Module) -> int:
    """Give inference-mode weights a normal tensor, one parameter at a time, so autograd may save them.

    ComfyUI may create weights under inference_mode; autograd refuses to save such tensors for backward. Each is
    replaced by a normal tensor with the same values (peak extra memory: one parameter). Returns how many changed.
    """
    changed = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    changed += 1
    return changed


def trainable_pack(pack: SafeRoPEPack, recipe: TrainingRecipe, device) -> tuple[SafeRoPEPack, list[torch.Tensor]]:
    """A copy of `pack` on `device` whose W tensors are leaf parameters (text and image, all blocks)."""
    g = torch.Generator().manual_seed(recipe.seed)
    out = pack.to(device)
    params = []
    for name in sorted(out.blocks, key=pack.shape.block_names().index):
        b = out.blocks[name]
        for attr, scale in (("w_txt", recipe.text_init_scale), ("w_img", recipe.image_init_scale)):
            w = getattr(b, attr).detach().clone()
            if not torch.any(w):
                w = scale * torch.randn(w.shape, generator=g)
            w = w.to(device).requires_grad_(True)
            setattr(b, attr, w)
            params.append(w)
    return out, params


@dataclass
class TrainingState:
    step: int
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer


def save_checkpoint(path, state: TrainingState, recipe, run_id: str, what: str = "risk rotations") -> None:
    """The run's parameters and optimizer state, with its recipe, run id and what it trains."""
    tensors = {f"param/{i}": p for i, p in enumerate(state.params)}
    opt = state.optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {
        "kind": CHECKPOINT_KIND,
        "step": state.step,
        "recipe": recipe.to_dict(),
        "subspaces": run_id,  # the run id (the key's name is kept: older checkpoints hold it)
        "trains": what,
        "param_groups": json.loads(json.dumps(opt["param_groups"])),
    }
    write_file(path, tensors, meta)


def load_checkpoint(
    path,
    state: TrainingState,
    recipe,
    run_id: str,
    what: str = "risk rotations",
    trained_on: str = "different subspaces",
) -> None:
    """Restore the parameters and the optimizer into `state`; CheckpointError if it is unreadable or belongs to
    another run: of another kind (`what` it trains) or on other inputs (`trained_on` says which)."""
    tensors, meta = read_safetensors(path, CheckpointError)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a SafeRoPE training checkpoint")
    check_hash(tensors, meta, str(path), CheckpointError, required=False)  # unhashed before December 2026
    theirs = meta.get("trains", "risk rotations")  # checkpoints written before the key trained rotations
    if theirs != what:
        raise CheckpointError(f"{path} trains {theirs}, not {what}")
    if meta.get("subspaces") != run_id:
        raise CheckpointError(f"{path} holds {what} trained on {trained_on}")
    theirs = dict(meta.get("recipe", {}))
    mine = recipe.to_dict()
    for key in mine:
        if key != "steps" and theirs.get(key) != mine[key]:
            raise CheckpointError(f"{path} used {key}={theirs.get(key)!r}, this run uses {mine[key]!r}")
    missing = [f"param/{i}" for i in range(len(state.params)) if f"param/{i}" not in tensors]
    if missing or "param_groups" not in meta or "step" not in meta:
        raise CheckpointError(f"{path} is incomplete (missing {missing[:2] or 'metadata'})")
    with torch.no_grad():
        for i, p in enumerate(state.params):
            p.copy_(tensors[f"param/{i}"].to(p.device))
    opt_state = {}
    for name, value in tensors.items():
        if name.startswith("opt/"):
            _, idx, key = name.split("/")
            opt_state.setdefault(int(idx), {})[key] = value
    state.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    state.step = int(meta["step"])


@dataclass
class TrainingRun:
    """How a run keeps and reports itself: its checkpoint file (None: none), resumed from when it exists and
    `resume` is on, written every `checkpoint_every` steps and at the last; `on_step(step, kind, figure, loss)`
    after each step; `should_stop()` raises to cancel; `checkpointing`: gradient checkpointing of the blocks."""

    checkpoint_path: str | None = None
    resume: bool = True
    checkpoint_every: int = 100
    on_step: object = None
    should_stop: object = None
    checkpointing: bool = False


def run_training(patcher, objective, recipe, run: TrainingRun) -> int:
    """The one trainer: the model frozen (gradients reach only the objective's tensors), RoPE with a backward,
    checkpoints, resume, progress and cancel, around a strategy `objective` that provides:
    - `what` (what it trains) and `run_id` (a checkpoint of another run is refused), `trained_on` (what differs then);
    - `start(device)` -> (trainable tensors, the model patched to use them);
    - `step(index, device, base, trained)` -> (loss, figure to log, kind), with the base and the trained model's
      velocity functions;
    - `finish(device, base, trained)`: after the last step, still in training mode.
    Returns the steps done (a resumed checkpoint of a longer run holds more than the recipe asks)."""
    device = patcher.load_device
    make_autograd_safe(patcher.model)  # before freezing, so no reference to replaced weights is kept
    with torch.inference_mode(False), torch.enable_grad(), frozen(patcher.model), differentiable_rope():
        params, trained = objective.start(device)
        state = TrainingState(0, params, torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0))
        if run.resume and run.checkpoint_path and os.path.isfile(run.checkpoint_path):
            load_checkpoint(run.checkpoint_path, state, recipe, objective.run_id, objective.what, objective.trained_on)
        base_opts, train_opts = call_options(patcher), training_options(trained, run.checkpointing)

        def base(x, s, p):
            return velocity(patcher, x, s, p, options=base_opts)

        def trained_velocity(x, s, p):
            return velocity(trained, x, s, p, options=train_opts)

        def step(index):
            return objective.step(index, device, base, trained_velocity)

        checkpoint = (run.checkpoint_path, run.checkpoint_every, objective.run_id, objective.what)
        run_steps(state, recipe, step, checkpoint, run.on_step, run.should_stop)
        objective.finish(device, base, trained_velocity)
    return state.step


def run_steps(state: TrainingState, recipe, step, checkpoint: tuple, on_step=None, should_stop=None) -> None:
    """Optimise until `recipe.steps` at the learning rate of the recipe's `lr_schedule` (constant where it has none):
    `step(index)` gives (loss, the figure to log, kind); `checkpoint` is (path or None, every how many steps, the
    run's id, what it trains), also written at the last step; `should_stop` raises to cancel."""
    path, every, run_id, what = checkpoint
    schedule = getattr(recipe, "lr_schedule", "constant")
    while state.step < recipe.steps:
        if should_stop is not None:
            should_stop()
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate_at(recipe.learning_rate, state.step, recipe.steps, schedule)
        loss, figure, kind = step(state.step)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        if on_step is not None:
            on_step(state.step, kind, figure, float(loss.detach()))
        if path and (state.step % every == 0 or state.step == recipe.steps):
            save_checkpoint(path, state, recipe, run_id, what)


@dataclass
class TrainingData:
    prompts: PromptSet
    latent_size: tuple[int, int, int]
    safe_latents: torch.Tensor | None = None  # [N, C, h, w], model-space latents of safe images
    safe_captions: list[str] | None = None


class RotationTrainer:
    """Trains the rotations of an untrained (or partly trained) pack on a frozen FLUX ModelPatcher: the objective
    `run_training` runs (redirect or deviate, TrainingRecipe.objective)."""

    what, trained_on = "risk rotations", "different subspaces"

    def __init__(
        self,
        patcher,
        clip,
        subspaces: SafeRoPEPack,
        data: TrainingData,
        recipe: TrainingRecipe,
        checkpointing: bool = False,
    ):
        self.patcher, self.clip, self.data, self.recipe = patcher, clip, data, recipe
        self.subspaces = subspaces
        self.run_id = content_hash(subspaces.tensors(), {"rank": subspaces.rank})
        self.checkpointing = checkpointing
        self._encoded: dict[str, EncodedPrompt] = {}
        self.unsafe, self.held_out_unsafe = held_out_split(data.prompts.unsafe, seed=recipe.seed)
        self.safe, self.held_out_safe = held_out_split(data.prompts.safe, seed=recipe.seed)
        self.neighbours: list[str] = []  # training safe prompts nearest to the concept (set by find_neighbours)
        self.report: HeldOutReport | None = None  # set at the end of `train`

    def find_neighbours(self, device, most: int = 256) -> None:
        """Rank the safe prompts by the pack's own measure, their mean LRS in the selected heads at pure noise:
        the nearest quarter of the training ones get half of the preservation steps, the held-out ones are
        reported nearest first. At most `most` prompts are measured (a seeded sample)."""
        observer = RiskObserver(self.subspaces)
        observed = with_qk_editor(self.patcher, observer)
        noise = torch.randn((1, *self.data.latent_size), generator=torch.Generator().manual_seed(self.recipe.seed))
        pool = self.safe if len(self.safe) <= most else random.Random(self.recipe.seed).sample(self.safe, most)
        risk = {}
        with torch.no_grad():
            for text in [*pool, *self.held_out_safe]:
                observer.reset()
                velocity(observed, noise.to(device), torch.ones(1, device=device), self._prompt(text))
                text_risk = observer.mean("txt")
                risk[text] = float(text_risk.mean()) if text_risk is not None else 0.0
        self.neighbours = sorted(pool, key=risk.get, reverse=True)[: max(1, len(pool) // 4)]
        self.held_out_safe.sort(key=risk.get, reverse=True)

    def _prompt(self, text: str) -> EncodedPrompt:
        if text not in self._encoded:
            self._encoded[text] = encode_prompt(self.clip, text)
        return self._encoded[text]

    def _batch(self, step: int, device):
        """The (deterministic) sample of a step: kind, prompt, noise, sigma, clean latent or None."""
        rng = random.Random(self.recipe.seed * 1_000_003 + step)
        g = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step)
        kind = batch_kind(step, self.recipe.run_length)
        clean, anchor = None, None
        if kind == "unsafe":
            unsafe = rng.choice(self.unsafe)
            text, anchor = unsafe.text, self._prompt(unsafe.anchor)
        elif self.neighbours and rng.random() < 0.5:
            text = rng.choice(self.neighbours)
        elif self.data.safe_latents is not None:
            i = rng.randrange(self.data.safe_latents.shape[0])
            text, clean = self.data.safe_captions[i], self.data.safe_latents[i : i + 1].to(device)
        else:
            text = rng.choice(self.safe)
        shape = clean.shape[1:] if clean is not None else self.data.latent_size
        noise = torch.randn((1, *shape), generator=g).to(device)
        sigma = torch.tensor([self.recipe.sigma_min + (1 - self.recipe.sigma_min) * rng.random()], device=device)
        return kind, self._prompt(text), anchor, noise, sigma, clean

    def _loss(self, kind, prompt, anchor, noise, sigma, clean, base, rot):
        """(loss, the logged figure) of one step: for unsafe prompts the redirect gap (1 at the start, 0 when the
        anchor is drawn) or the deviation (x_t = noise, as in the paper); for safe ones the deviation from the
        base, on the safe image's path or on the prompt's own."""
        recipe = self.recipe
        if kind == "unsafe" and recipe.objective == "redirect":
            on_anchor_path = one_step_clean(base, noise, anchor)
            gap = redirect_gap(base, rot, prompt, anchor, noise, sigma, on_anchor_path, recipe.sideways_weight)
            return redirect_loss(gap, recipe), gap
        if kind == "safe" and clean is None:
            clean = one_step_clean(base, noise, prompt)  # the prompt's own path
        dev = deviation(base, rot, prompt, noise, sigma, clean)
        return (unlearn_loss(dev, recipe) if kind == "unsafe" else preserve_loss(dev, recipe)), dev

    def train(
        self,
        checkpoint_path: str | None = None,
        resume: bool = True,
        checkpoint_every: int = 100,
        on_step=None,
        should_stop=None,
    ) -> SafeRoPEPack:
        """The trained pack (on the CPU) with its recipe and held-out report."""
        run = TrainingRun(checkpoint_path, resume, checkpoint_every, on_step, should_stop, self.checkpointing)
        steps = run_training(self.patcher, self, self.recipe, run)
        # the recipe says what was trained: a checkpoint of a longer run holds more steps than this run asked for
        recipe = dataclasses.replace(self.recipe, steps=max(steps, self.recipe.steps))
        return finished_pack(self.subspaces, self._pack, recipe, self.report)

    def start(self, device):
        self._pack, params = trainable_pack(self.subspaces, self.recipe, device)
        self.find_neighbours(device)
        return params, with_qk_editor(self.patcher, RiskRotation(self._pack, 1.0, ("txt", "img")))

    def step(self, index: int, device, base, rot):
        kind, prompt, anchor, noise, sigma, clean = self._batch(index, device)
        loss, dev = self._loss(kind, prompt, anchor, noise, sigma, clean, base, rot)
        return loss, float(dev.detach().mean()), kind

    def finish(self, device, base, rot) -> None:
        noise = torch.randn((1, *self.data.latent_size), generator=torch.Generator().manual_seed(self.recipe.seed + 1))
        self.report = held_out_report(
            self.recipe.objective,
            base,
            rot,
            [(self._prompt(u.text), self._prompt(u.anchor)) for u in self.held_out_unsafe],
            [(text, self._prompt(text)) for text in self.held_out_safe[:8]],
            noise.to(device),
        )


def finished_pack(
    subspaces: SafeRoPEPack, trained: SafeRoPEPack, recipe: TrainingRecipe, report: HeldOutReport | None = None
) -> SafeRoPEPack:
    out = subspaces.to("cpu")
    for name, b in out.blocks.items():
        b.w_txt = trained.blocks[name].w_txt.detach().float().cpu()
        b.w_img = trained.blocks[name].w_img.detach().float().cpu()
    out.recipe = {"trained": True, **recipe.to_dict()}
    if report is not None:
        out.recipe["held_out"] = report.to_dict()
    return out
