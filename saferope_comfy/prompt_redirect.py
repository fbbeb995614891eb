"""Prompt redirection inside ComfyUI: the APPLY_MODEL wrapper that redirects flagged samples' text conditioning,
and the trainer of a redirector on a frozen model.

- `RedirectWrapper` (Redirect Unsafe Prompts): an APPLY_MODEL wrapper (ComfyUI's extension point around every model
  call). Per call and per sample (batch index and CFG branch) it asks the detector about (conditioning, latent,
  sigma) and passes the redirected conditioning for flagged samples; the others get theirs untouched, and a call with
  nothing flagged is the unpatched call. Flagged samples stay redirected for `cooldown` calls; that count lives from
  the start of a sampling run to its end (an OUTER_SAMPLE wrapper, like UVR's state), so no run sees another's.
- `RedirectorTrainer` (Train Prompt Redirector): the model stays frozen and is never copied; only the redirector
  learns. Unsafe steps: the model's velocity with the redirected conditioning of an unsafe prompt is brought to the
  base velocity on its anchor (same latent, same noise level, along the anchor's path). The detector learns what
  makes a sample unsafe: the unsafe prompt on either path, and its anchor on the unsafe prompt's path (the image is
  becoming the concept), weighted by how far the latent is from pure noise (1 - sigma); "safe" for the anchor on its
  own path. Safe steps: the redirector leaves the safe prompt's conditioning as it is, and the detector learns
  "safe". Checkpoints and resume as Train Risk Rotations.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import comfy.model_patcher
import comfy.patcher_extension
import torch
import torch.nn.functional as F

from ..saferope_core import PromptSet, noised_latent, one_step_clean, redirect_gap
from ..saferope_core.files import content_hash
from ..saferope_core.redirector import PromptRedirector, Redirection, RedirectorConfig
from .flux_adapter import RUN_STATES, RunStateWrapper, flux_model, model_family
from .model_calls import EncodedPrompt, encode_prompt
from .training import TrainingRun, run_training

WRAPPER_KEY = "saferope_prompt_redirect"


class RedirectWrapper:
    """APPLY_MODEL wrapper: redirect the conditioning of the samples the detector flags. Its per-run state (the
    cool-down counts) comes from `new_run_state` through the OUTER_SAMPLE RunStateWrapper, keyed by id(self)."""

    def __init__(self, redirector: PromptRedirector, strength: float, threshold: float, cooldown: int):
        self.redirector, self.strength, self.threshold, self.cooldown = redirector, strength, threshold, cooldown

    def __deepcopy__(self, memo):  # ComfyUI deep-copies wrappers with model options; the weights are shared
        return self

    def new_run_state(self) -> Redirection:
        return Redirection(self.redirector, self.strength, self.threshold, self.cooldown)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        transformer_options = transformer_options if transformer_options is not None else {}
        if c_crossattn is None or self.strength == 0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        redirection = getattr(transformer_options.get(RUN_STATES), "by_editor", {}).get(id(self))
        redirection = redirection if redirection is not None else self.new_run_state()  # outside a sampler
        branches = list(transformer_options.get("cond_or_uncond", [0]))
        per = max(x.shape[0] // max(len(branches), 1), 1)
        keys = [(branches[min(i // per, len(branches) - 1)], i % per) for i in range(x.shape[0])]
        context, _ = redirection(keys, c_crossattn, x, t.reshape(-1).expand(x.shape[0]))
        return executor(x, t, c_concat, context, control, transformer_options, **kw)


def with_redirection(patcher, wrapper: RedirectWrapper):
    """A clone of `patcher` whose model calls go through `wrapper` (stacks with every other patch of the pack). The
    redirector's weights are an additional model of the clone: ComfyUI's model management loads them with the model
    (onto its device) and offloads them with it."""
    flux_model(patcher)
    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, RunStateWrapper(wrapper))
    clone.set_additional_models(f"{WRAPPER_KEY}_{id(wrapper)}", [weights_patcher(wrapper.redirector, patcher)])
    return clone


def weights_patcher(redirector: PromptRedirector, patcher):
    """The ModelPatcher that carries the redirector's weights for ComfyUI's model management: one per redirector and
    device pair, kept on the redirector. ComfyUI warns of a memory leak (and collects garbage before every run)
    when a loaded model outlives its patcher, as the redirector of a cached Load node outlives the clones made from
    it."""
    devices = (patcher.load_device, patcher.offload_device)
    kept = vars(redirector).setdefault("_comfy_patchers", {})
    if devices not in kept:
        kept[devices] = comfy.model_patcher.ModelPatcher(redirector, *devices)
    return kept[devices]


def redirector_config(patcher) -> RedirectorConfig:
    """The redirector's shape read from the model: family, text conditioning width (what its text input layer
    takes), latent channels."""
    model = flux_model(patcher)
    return RedirectorConfig(
        model_family(model), int(model.txt_in.in_features), int(patcher.model.latent_format.latent_channels)
    )


@dataclass
class RedirectorRecipe:
    steps: int = 400
    learning_rate: float = 1e-3
    keep_weight: float = 10.0  # weight of leaving safe prompts' conditioning unchanged
    detect_weight: float = 1.0
    sigma_min: float = 0.3
    seed: int = 0
    # the learning rate falls along a half cosine to 0 (saferope_core.learning_rate_at). Measured on the testbed
    # (striped, world with defaults, mined Prompt Set, 400 steps): redirect gap 0.103 -> 0.059 and target prompts
    # erased 52 -> 88 % against a constant rate
    lr_schedule: str = "cosine"

    def to_dict(self) -> dict:
        return asdict(self)


class _AlwaysRedirect:
    """APPLY_MODEL wrapper used in training: every sample's conditioning is redirected (differentiably)."""

    def __init__(self, redirector: PromptRedirector):
        self.redirector = redirector

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        return executor(x, t, c_concat, self.redirector.redirect(c_crossattn), control, transformer_options, **kw)


class RedirectorTrainer:
    """Trains a prompt redirector on a frozen FLUX ModelPatcher: the objective `run_training` runs."""

    what, trained_on = "a prompt redirector", "another model or Prompt Set"

    def __init__(
        self, patcher, clip, prompts: PromptSet, latent_size, recipe: RedirectorRecipe, config, checkpointing=False
    ):
        self.patcher, self.clip, self.prompts, self.latent_size = patcher, clip, prompts, latent_size
        self.recipe, self.config, self.checkpointing = recipe, config, checkpointing
        self._encoded: dict[str, EncodedPrompt] = {}
        self.steps_done = 0
        self.run_id = content_hash({}, {"config": asdict(config), "unsafe": [p.text for p in prompts.unsafe]})
        self.redirector: PromptRedirector | None = None  # made by `start`

    def _prompt(self, text: str) -> EncodedPrompt:
        if text not in self._encoded:
            self._encoded[text] = encode_prompt(self.clip, text)
        return self._encoded[text]

    def train(self, checkpoint_path=None, resume=True, checkpoint_every=100, on_step=None, should_stop=None):
        """The trained PromptRedirector (on the CPU), with its concept and recipe (the steps it was trained for: a
        checkpoint of a longer run holds more than this run asked)."""
        run = TrainingRun(checkpoint_path, resume, checkpoint_every, on_step, should_stop, self.checkpointing)
        self.steps_done = run_training(self.patcher, self, self.recipe, run)
        redirector = self.redirector.cpu().train(False)
        redirector.concept = self.prompts.concept
        redirector.recipe = {**self.recipe.to_dict(), "steps": max(self.recipe.steps, self.steps_done)}
        return redirector

    def start(self, device):
        torch.manual_seed(self.recipe.seed)  # the redirector's start (normal tensors: created outside inference mode)
        self.redirector = PromptRedirector(self.config).to(device)
        patched = self.patcher.clone()
        patched.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _AlwaysRedirect(self.redirector)
        )
        return list(self.redirector.parameters()), patched

    def finish(self, device, base, redirected) -> None:
        pass

    def step(self, step, device, base, redirected):
        """(loss, logged figure, kind) of one step; unsafe and safe steps alternate."""
        recipe, redirector = self.recipe, self.redirector
        rng = random.Random(recipe.seed * 1_000_003 + step)
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        noise = torch.randn((1, *self.latent_size), generator=g).to(device)
        sigma = torch.tensor([recipe.sigma_min + (1 - recipe.sigma_min) * rng.random()], device=device)

        def on_path(prompt):
            return noised_latent(noise, sigma, one_step_clean(base, noise, prompt))

        def detect(prompt, x, label):
            logit = redirector.unsafe_logit(prompt.context.to(device), x, sigma)
            return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, label))

        if step % 2 == 0:
            unsafe = rng.choice(self.prompts.unsafe)
            prompt, anchor = self._prompt(unsafe.text), self._prompt(unsafe.anchor)
            x = on_path(anchor)
            gap = redirect_gap(base, redirected, prompt, anchor, x, sigma)  # x is already on the path
            loss = torch.log(1e-3 + gap).mean()
            x_unsafe = on_path(prompt)  # where the unsafe prompt's own sampling goes
            # the anchor on the unsafe path counts as unsafe only as far as the latent can tell (not at pure noise,
            # where it is the anchor's own start): else benign prompts get flagged and redrawn
            from_latent = (1 - sigma) * detect(anchor, x_unsafe, 1.0)
            unsafe_cases = detect(prompt, x, 1.0) + detect(prompt, x_unsafe, 1.0) + from_latent
            loss = loss + recipe.detect_weight * (unsafe_cases + detect(anchor, x, 0.0))
            return loss, float(gap.detach().mean()), "unsafe"
        prompt = self._prompt(rng.choice(self.prompts.safe))
        x = on_path(prompt)
        context = prompt.context.to(device)
        kept = (redirector.redirect(context) - context).float().square().sum() / context.float().square().sum()
        loss = recipe.keep_weight * kept + recipe.detect_weight * detect(prompt, x, 0.0)
        return loss, float(kept.detach()), "safe"


def refuse_other_model(config: RedirectorConfig, patcher) -> str | None:
    """Why a redirector does not fit this model (family, conditioning width, latent channels), or None."""
    mine = redirector_config(patcher)
    for name, label in (
        ("family", "model family"),
        ("width", "text conditioning width"),
        ("latent_channels", "latent channels"),
    ):
        if getattr(config, name) != getattr(mine, name):
            return f"it was trained for {label} {getattr(config, name)!r}, this model has {getattr(mine, name)!r}"
    return None
