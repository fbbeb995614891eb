"""UVR: Collect UVR Anchors and Restrict Unsafe Flow (training-free, text-to-image and Kontext editing).

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

import zlib

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..saferope_core import PromptSet, QKStatistics, site_name
from ..saferope_core.uvr import UVRAnchors, build_anchors, patch_mask, patch_scores, reference_patches
from . import model_files
from .collect_nodes import parse_sigmas, target_path
from .errors import SafeRoPEInputError, require_flux
from .flux_adapter import with_qk_editor
from .model_calls import encode_prompt, latent_shape, load_model, velocity

ANCHORS_FOLDER = model_files.STATS_FOLDER


class AttentionOutputCollector:
    """Attention editor that records per-head outputs of image tokens at one block; never edits."""

    def __init__(self, stats: QKStatistics, block: str):
        self.stats, self.block = stats, block
        self.group: str | None = None

    def edit_qk(self, call, block, tokens, q, k):
        return q, k

    def edit_attention(self, call, block, q, k, v, heads, attend):
        out = attend(q, k, v)
        if self.group is not None and block == self.block:
            lay = call.layout
            image = out[:, lay.txt:lay.txt + lay.img]
            self.stats.add(self.group, site_name(block, "img", "o"), image.reshape(-1, heads, q.shape[-1]))
        return out


class UnsafeFlowRestriction:
    """Attention editor: detect flagged patches at the anchors' block, restrict flow in the other blocks.

    The mask of a step is kept for the next start-up step of the same samples (same CFG branches, batch and size),
    so the blocks before the detection block are restricted too; a new sampling run starts without one.
    """

    def __init__(self, anchors: UVRAnchors, strength: float, threshold: float, sigma_start: float,
                 min_patches: int = 2):
        self.anchors, self.strength, self.threshold = anchors, strength, threshold
        self.sigma_start, self.min_patches = sigma_start, min_patches
        self.last_detection: dict | None = None  # scores/core/ring of the latest detection, for inspection
        self._previous: dict = {}  # samples key -> (sigma, core, ring) of their latest detection

    def edit_qk(self, call, block, tokens, q, k):
        return q, k

    def edit_attention(self, call, block, q, k, v, heads, attend):
        state = call.scratch.get(id(self)) or self._begin(call)
        if state["active"] is None:
            return attend(q, k, v)
        if block == self.anchors.block:
            out = attend(q, k, v)
            self._detect(call, out, heads, q.shape[-1], state)
            return out
        if not state["flagged"]:
            return attend(q, k, v)
        if call.layout.refs:
            return attend(q, k, v, key_bias=self._reference_bias(call, state["core"], state["ring"], q))
        return self._suppress(call, attend(q, k, v), state["core"], block)

    def _begin(self, call) -> dict:
        """Per-call state, computed once (no device sync per block): which samples are in the start-up steps and
        the mask carried from this run's previous step, if any."""
        sigma = call.sigma.reshape(-1).float().cpu()
        active = sigma >= self.sigma_start - 1e-6
        state = {"active": None, "core": None, "ring": None, "flagged": False}
        if self.strength != 0 and bool(active.any()):
            state["active"] = active
            state["core"], state["ring"] = self._previous_mask(call, float(sigma.max()))
            state["flagged"] = state["core"] is not None and bool(state["core"].any())
        call.scratch[id(self)] = state
        return state

    @staticmethod
    def _samples_key(call) -> tuple:
        lay = call.layout
        return tuple(call.transformer_options.get("cond_or_uncond", ())), lay.batch, lay.img_hw, lay.refs

    def _previous_mask(self, call, now: float):
        """(core, ring) detected for the same samples at an earlier step of this sampling run, or (None, None)."""
        sigma, core, ring = self._previous.get(self._samples_key(call), (None, None, None))
        run_sigmas = call.transformer_options.get("sample_sigmas")
        first_step = run_sigmas is not None and now >= float(run_sigmas[0]) - 1e-6
        if sigma is None or first_step or now >= sigma - 1e-6:  # a new run, or not an earlier step
            return None, None
        return core, ring

    def _detect(self, call, out, heads, head_dim, state):
        lay = call.layout
        image = out[:, lay.txt:lay.txt + lay.img].reshape(-1, heads, head_dim)
        scores = patch_scores(image, self.anchors.anchors, self.anchors.safe_mean).reshape(-1, *lay.img_hw)
        core, ring = patch_mask(scores, self.threshold, self.min_patches)
        keep = state["active"].to(core.device)[:, None, None]
        state["scores"], state["core"], state["ring"] = scores, core & keep, ring & keep
        state["flagged"] = bool(state["core"].any())
        self._previous[self._samples_key(call)] = (float(call.sigma.max()), state["core"], state["ring"])
        self.last_detection = {k: state[k] for k in ("scores", "core", "ring")}

    def _suppress(self, call, out, core, block):
        lay = call.layout
        flagged = core.reshape(core.shape[0], -1)  # [B, img]
        image = out[:, lay.txt:lay.txt + lay.img]
        g = torch.Generator().manual_seed(zlib.crc32(block.encode()))  # fixed noise per block
        noise = torch.randn(image.shape, generator=g).to(image) * image.float().std().to(image.dtype)
        mix = 0.999 * self.strength
        restricted = torch.where(flagged.unsqueeze(-1), (1 - mix) * image + mix * noise, image)
        return torch.cat((out[:, :lay.txt], restricted, out[:, lay.txt + lay.img:]), dim=1)

    def _reference_bias(self, call, core, ring, q):
        lay = call.layout
        ref_ids = call.img_ids[0, lay.img:lay.img + sum(lay.refs)]
        target = reference_patches(ref_ids, lay.img_hw, list(lay.refs)).to(q.device)
        s = self.strength
        factors = torch.ones(core.shape[0], lay.total, device=q.device)
        flagged = core.reshape(core.shape[0], -1).any(-1, keepdim=True)  # samples with anything flagged
        factors[:, :lay.txt + lay.img] = torch.where(flagged, 1 + 0.1 * s, 1.0)
        ref = slice(lay.txt + lay.img, lay.total)
        factors[:, ref] = torch.where(ring.reshape(core.shape[0], -1)[:, target], 1 - 0.6 * s, factors[:, ref])
        factors[:, ref] = torch.where(core.reshape(core.shape[0], -1)[:, target], 1 - 0.8 * s, factors[:, ref])
        return torch.log(factors.clamp_min(1e-4))


def detection_block_name(node: str, shape, index: int) -> str:
    if not 0 <= index < shape.single_blocks:
        raise SafeRoPEInputError(node, "detection_block", f"single block {index} does not exist (the model has "
                                 f"{shape.single_blocks})", "The paper uses single block 10 of FLUX's 38")
    return f"single.{index}"


class CollectUVRAnchors:
    DESCRIPTION = ("Runs FLUX on unsafe and safe prompts in the start-up steps and records, at the detection block, "
                   "the per-head attention outputs of image tokens; reduces them to a few anchor directions per "
                   "head and calibrates a detection threshold.")
    CATEGORY = "SafeRoPE/UVR"
    RETURN_TYPES = ("UVR_ANCHORS", "STRING")
    RETURN_NAMES = ("anchors", "report")
    FUNCTION = "collect"
    NODE = "Collect UVR Anchors"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",), "prompts": ("SAFEROPE_PROMPTS",),
            "detection_block": ("INT", {"default": 10, "min": 0, "max": 255, "tooltip": "single block index"}),
            "sigmas": ("STRING", {"default": "1.0, 0.95, 0.9", "tooltip": "start-up noise levels"}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16}),
            "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16}),
            "anchors_per_head": ("INT", {"default": 4, "min": 1, "max": 64}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    def collect(self, model, clip, prompts: PromptSet, detection_block, sigmas, width, height, anchors_per_head,
                seed):
        shape = require_flux(self.NODE, model)
        block = detection_block_name(self.NODE, shape, detection_block)
        sigma_list = parse_sigmas(sigmas, self.NODE)
        stats = QKStatistics(shape, 4096, seed, [prompts.concept])
        collector = AttentionOutputCollector(stats, block)
        patched = with_qk_editor(model, collector)
        device = load_model(patched)
        jobs = [("unsafe", p.text) for p in prompts.unsafe] + [("safe", t) for t in prompts.safe]
        generator = torch.Generator().manual_seed(seed)
        size = latent_shape(patched, width, height)
        progress = comfy.utils.ProgressBar(len(jobs) * len(sigma_list))
        for group, text in jobs:
            comfy.model_management.throw_exception_if_processing_interrupted()
            prompt = encode_prompt(clip, text)
            collector.group = group
            for sigma in sigma_list:
                velocity(patched, torch.randn((1, *size), generator=generator).to(device), torch.tensor([sigma]),
                         prompt)
                progress.update(1)
        collector.group = None
        try:
            anchors = build_anchors(stats, block, anchors_per_head, min(sigma_list))
        except ValueError as err:
            raise SafeRoPEInputError(self.NODE, "prompts", str(err)) from None
        report = (f"{len(prompts.unsafe)} unsafe and {len(prompts.safe)} safe prompts at {block}; "
                  f"{anchors_per_head} anchors per head; calibrated threshold {anchors.threshold:.3f}")
        return (anchors, report)


class RestrictUnsafeFlow:
    DESCRIPTION = __doc__
    CATEGORY = "SafeRoPE/UVR"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    NODE = "Restrict Unsafe Flow"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "anchors": ("UVR_ANCHORS",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            "threshold": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "patch score above which a patch is unsafe; -1 = the anchors' "
                                               "calibrated threshold"}),
            "sigma_start": ("FLOAT", {"default": 0.85, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "act in the start-up steps, sigma >= this"}),
            "detection_block": ("INT", {"default": -1, "min": -1, "max": 255,
                                        "tooltip": "-1 = the block the anchors were collected at"}),
        }}

    def apply(self, model, anchors: UVRAnchors, strength, threshold, sigma_start, detection_block):
        shape = require_flux(self.NODE, model)
        problem = anchors.shape.mismatch(shape)
        if problem:
            raise SafeRoPEInputError(self.NODE, "anchors", f"anchors were collected on another model ({problem})",
                                     "Collect UVR Anchors on this model")
        if detection_block >= 0 and f"single.{detection_block}" != anchors.block:
            raise SafeRoPEInputError(self.NODE, "detection_block", f"the anchors belong to {anchors.block}",
                                     "Leave -1, or collect anchors at that block")
        cut = anchors.threshold if threshold < 0 else threshold
        editor = UnsafeFlowRestriction(anchors, float(strength), float(cut), float(sigma_start))
        return (with_qk_editor(model, editor),)


class SaveUVRAnchors:
    DESCRIPTION = "Writes anchors to models/saferope_statistics/<name>.safetensors."
    CATEGORY = "SafeRoPE/UVR"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    NODE = "Save UVR Anchors"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"anchors": ("UVR_ANCHORS",), "name": ("STRING", {"default": "uvr_anchors"}),
                             "overwrite": ("BOOLEAN", {"default": False})}}

    def save(self, anchors: UVRAnchors, name, overwrite):
        path = target_path(self.NODE, model_files.output_dir(ANCHORS_FOLDER), name, overwrite)
        anchors.save(path)
        return {"ui": {"text": [f"saved {path}"]}, "result": (path,)}


class LoadUVRAnchors:
    DESCRIPTION = "Loads anchors saved by Save UVR Anchors."
    CATEGORY = "SafeRoPE/UVR"
    RETURN_TYPES = ("UVR_ANCHORS",)
    FUNCTION = "load"
    NODE = "Load UVR Anchors"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (folder_paths.get_filename_list(ANCHORS_FOLDER),)}}

    def load(self, name):
        try:
            return (UVRAnchors.load(folder_paths.get_full_path_or_raise(ANCHORS_FOLDER, name)),)
        except ValueError as err:
            raise SafeRoPEInputError(self.NODE, "name", str(err), "Collect and save the anchors again") from None

