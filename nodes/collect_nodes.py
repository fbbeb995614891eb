"""Collect & Train, first half: prompt set -> collected q/k statistics -> subspaces and safety-critical heads.

Build Subspaces outputs an untrained SAFEROPE_PACK (bases, selected heads, delta table, rotations at zero), so
subspaces are saved and loaded with the pack nodes and there is one file format for both.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..saferope_core import (
    PromptSet,
    QKStatistics,
    SafeRoPEPack,
    build_subspaces,
    build_unsafe_prompts,
    clean_lines,
    locate_subjects,
    site_name,
)
from ..saferope_core.prompts import content_span, default_concepts, default_lists, read_prompt_file
from . import model_files
from .errors import SafeRoPEInputError, require_flux
from .flux_adapter import with_qk_editor
from .model_calls import context_token_ids, encode_prompt, latent_shape, load_model, model_inputs, velocity
from .model_files import STATS_FOLDER

CUSTOM = "custom"


class SafeRoPEPromptSet:
    """Unsafe prompts (subject x modifier x template, subject marked) and safe prompts."""

    DESCRIPTION = ("Builds the prompts a pack is made from. Pick a shipped concept, or 'custom' and type subjects, "
                   "modifiers and templates (one per line; a template holds {subject} and may hold {modifier}). "
                   "Empty boxes use the shipped lists of the chosen concept.")
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("SAFEROPE_PROMPTS", "STRING")
    RETURN_NAMES = ("prompts", "summary")
    FUNCTION = "build"
    NODE = "SafeRoPE Prompt Set"

    @classmethod
    def INPUT_TYPES(cls):
        text = {"multiline": True, "default": ""}
        return {
            "required": {
                "concept": ([*default_concepts(), CUSTOM], {"default": "nudity"}),
                "subjects": ("STRING", {**text, "tooltip": "trigger phrases, one per line (empty: shipped list)"}),
                "modifiers": ("STRING", {**text, "tooltip": "one per line (empty: shipped list)"}),
                "templates": ("STRING", {**text, "tooltip": "one per line, with {subject} (empty: shipped list)"}),
                "safe_prompts": ("STRING", {**text, "tooltip": "one per line (empty: shipped list)"}),
                "max_unsafe": ("INT", {"default": 200, "min": 1, "max": 100000}),
                "max_safe": ("INT", {"default": 200, "min": 1, "max": 100000}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            },
            "optional": {
                "safe_prompt_file": ("STRING", {"default": "", "tooltip": ".txt (one per line) or .csv (column "
                                                "'prompt'/'caption'/'text'); added to the safe prompts"}),
                "concept_name": ("STRING", {"default": "", "tooltip": "name stored in the pack (default: concept)"}),
            },
        }

    def build(self, concept, subjects, modifiers, templates, safe_prompts, max_unsafe, max_safe, seed,
              safe_prompt_file="", concept_name=""):
        defaults = default_lists(concept) if concept != CUSTOM else {}
        lists = {}
        for name, text in (("subjects", subjects), ("modifiers", modifiers), ("templates", templates),
                           ("safe_prompts", safe_prompts)):
            lines = clean_lines(text)
            lists[name] = lines or defaults.get("safe" if name == "safe_prompts" else name, [])
        for name in ("subjects", "templates"):
            if not lists[name]:
                raise SafeRoPEInputError(self.NODE, name, "the list is empty",
                                         "Type one entry per line, or choose a shipped concept")
        if not any("{subject}" in t for t in lists["templates"]):
            raise SafeRoPEInputError(self.NODE, "templates", "no template contains {subject}",
                                     "Write templates like 'a photo of {subject}, {modifier}'")
        safe = list(lists["safe_prompts"])
        if safe_prompt_file.strip():
            try:
                safe += read_prompt_file(safe_prompt_file.strip(), limit=max_safe)
            except ValueError as err:
                raise SafeRoPEInputError(self.NODE, "safe_prompt_file", str(err), "Give a readable .txt or .csv path"
                                         ) from None
        if not safe:
            raise SafeRoPEInputError(self.NODE, "safe_prompts", "no safe prompts",
                                     "Type some, or give safe_prompt_file")
        unsafe = build_unsafe_prompts(lists["subjects"], lists["modifiers"], lists["templates"], max_unsafe, seed)
        if len(safe) > max_safe:
            safe = [safe[i] for i in sorted(torch.randperm(len(safe), generator=torch.Generator().manual_seed(seed))
                                            [:max_safe].tolist())]
        prompts = PromptSet(concept_name.strip() or concept, unsafe, safe)
        summary = (f"concept '{prompts.concept}': {len(unsafe)} unsafe prompts from {len(lists['subjects'])} subjects, "
                   f"{len(safe)} safe prompts\nfirst: {unsafe[0].text}")
        return (prompts, summary)


class QKCollector:
    """q/k editor that records the vectors of chosen text-token positions into statistics; never edits."""

    def __init__(self, stats: QKStatistics):
        self.stats = stats
        self.group: str | None = None
        self.positions: torch.Tensor | None = None

    def target(self, group: str | None, positions: list[int] | None = None) -> None:
        self.group = group
        self.positions = None if positions is None else torch.tensor(positions, dtype=torch.long)

    def edit_qk(self, call, block, tokens, q, k):
        if self.group is None or tokens != "txt":
            return q, k
        index = self.positions.to(q.device)
        for name, x in (("q", q), ("k", k)):
            chosen = x.index_select(2, index)  # [B, H, n, D]
            self.stats.add(self.group, site_name(block, "txt", name),
                           chosen.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]))
        return q, k


def parse_sigmas(text: str, node: str) -> list[float]:
    try:
        sigmas = [float(s) for s in text.replace(";", ",").split(",") if s.strip()]
    except ValueError:
        sigmas = []
    if not sigmas or not all(0 < s <= 1 for s in sigmas):
        raise SafeRoPEInputError(node, "sigmas", f"'{text}' is not a list of numbers in (0, 1]",
                                 "Write e.g. '1.0, 0.8, 0.6' (1.0 = pure noise)")
    return sigmas


class CollectQK:
    """Run the model on every prompt and accumulate per-head q/k statistics of subject / content tokens."""

    DESCRIPTION = ("Runs FLUX on each prompt (from noise, at the given sigmas) and accumulates, per block and head, "
                   "the queries and keys of the subject tokens of unsafe prompts and of the content tokens of safe "
                   "prompts. Memory does not grow with the number of prompts; split long runs and Merge them.")
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("SAFEROPE_STATS", "STRING")
    RETURN_NAMES = ("statistics", "report")
    FUNCTION = "collect"
    NODE = "Collect Q/K"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "prompts": ("SAFEROPE_PROMPTS",),
                "sigmas": ("STRING", {"default": "1.0, 0.8, 0.6", "tooltip": "noise levels the model is run at"}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "reservoir_size": ("INT", {"default": 1024, "min": 16, "max": 65536,
                                           "tooltip": "vectors kept per site for head selection"}),
            }
        }

    def collect(self, model, clip, prompts: PromptSet, sigmas, width, height, seed, reservoir_size):
        shape = require_flux(self.NODE, model)
        sigma_list = parse_sigmas(sigmas, self.NODE)
        tokenize = lambda text: context_token_ids(clip, text)  # noqa: E731
        location = locate_subjects(prompts.unsafe, tokenize)
        if not location.found:
            raise SafeRoPEInputError(self.NODE, "prompts", "the subject was not found in the tokens of any prompt\n"
                                     + location.report(prompts.unsafe), "Check the subjects and templates")
        empty = tokenize("")
        jobs = [("unsafe", prompts.unsafe[i].text, pos) for i, pos in sorted(location.found.items())]
        jobs += [("safe", text, None) for text in prompts.safe]
        stats = QKStatistics(shape, reservoir_size, seed, [prompts.concept])
        collector = QKCollector(stats)
        patched = with_qk_editor(model, collector)
        device = load_model(patched)
        generator = torch.Generator().manual_seed(seed)
        size = latent_shape(patched, width, height)
        progress = comfy.utils.ProgressBar(len(jobs) * len(sigma_list))
        for group, text, positions in jobs:
            comfy.model_management.throw_exception_if_processing_interrupted()
            prompt = encode_prompt(clip, text)
            if positions is None:
                positions = list(range(*content_span(prompt.token_ids, empty)))
            noises = [torch.randn((1, *size), generator=generator).to(device) for _ in sigma_list]
            context = model_inputs(patched, prompt, noises[0])["c_crossattn"]
            positions = prompt.context_positions(positions, context)
            if not positions:
                progress.update(len(sigma_list))
                continue
            collector.target(group, positions)
            for sigma, noise in zip(sigma_list, noises, strict=True):
                velocity(patched, noise, torch.tensor([sigma]), prompt)
                progress.update(1)
        collector.target(None)
        report = (location.report(prompts.unsafe) + f"\n{len(prompts.safe)} safe prompts; "
                  f"{len(sigma_list)} sigmas; statistics use {stats.nbytes() / 2**20:.1f} MiB")
        return (stats, report)


class MergeStatistics:
    DESCRIPTION = "Adds two collections (e.g. from different sessions or machines) into one."
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("SAFEROPE_STATS",)
    FUNCTION = "merge"
    NODE = "Merge Statistics"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("SAFEROPE_STATS",), "b": ("SAFEROPE_STATS",)}}

    def merge(self, a, b):
        try:
            return (a.merged(b),)
        except ValueError as err:
            raise SafeRoPEInputError(self.NODE, "b", str(err), "Merge statistics collected on the same model") from None


class BuildSubspaces:
    """Statistics -> unsafe bases, safety-critical heads and an untrained pack."""

    DESCRIPTION = ("Computes each head's unsafe subspace (rank r) and keeps the heads whose risk score separates "
                   "unsafe from safe vectors (delta >= hds_threshold). Outputs an untrained pack (rotations zero) "
                   "for Train Risk Rotations, and a summary.")
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("SAFEROPE_PACK", "STRING")
    RETURN_NAMES = ("subspaces", "summary")
    FUNCTION = "build"
    NODE = "Build Subspaces"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "statistics": ("SAFEROPE_STATS",),
                "rank": ("INT", {"default": 5, "min": 1, "max": 64}),
                "lrs_threshold": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01}),
                "hds_threshold": ("FLOAT", {"default": 0.5, "min": -1.0, "max": 1.0, "step": 0.01}),
            }
        }

    def build(self, statistics: QKStatistics, rank, lrs_threshold, hds_threshold):
        if rank > statistics.shape.head_dim:
            raise SafeRoPEInputError(self.NODE, "rank", f"rank {rank} is larger than the head dimension "
                                     f"{statistics.shape.head_dim}", "Use a rank like 2-10 (the paper uses 5)")
        if not statistics.sites("unsafe"):
            raise SafeRoPEInputError(self.NODE, "statistics", "no unsafe vectors were collected",
                                     "Run Collect Q/K with unsafe prompts")
        try:
            subspaces = build_subspaces(statistics, rank, lrs_threshold, hds_threshold)
        except ValueError as err:
            raise SafeRoPEInputError(self.NODE, "rank", str(err)) from None
        summary = subspaces.summary(statistics.shape.block_names())
        if not subspaces.selected.any():
            best = float(subspaces.delta.max())
            raise SafeRoPEInputError(
                self.NODE, "hds_threshold", f"no head reached delta >= {hds_threshold} (best delta {best:.2f})\n"
                + summary, f"Lower hds_threshold (e.g. to {max(best - 0.05, 0):.2f}), lower lrs_threshold, raise the "
                "rank, or collect more unsafe prompts")
        concepts = statistics.concepts or ["concept"]
        pack = SafeRoPEPack.from_subspaces(subspaces, statistics.shape, concepts, name="+".join(concepts))
        return (pack, summary)


class SaveSafeRoPEPack:
    DESCRIPTION = "Writes a pack (trained, or untrained subspaces) to models/saferope/<name>.safetensors."
    CATEGORY = "SafeRoPE"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    NODE = "Save SafeRoPE Pack"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pack": ("SAFEROPE_PACK",), "name": ("STRING", {"default": "my_pack"}),
                             "overwrite": ("BOOLEAN", {"default": False})}}

    def save(self, pack: SafeRoPEPack, name, overwrite):
        path = target_path(self.NODE, model_files.output_dir(), name, overwrite)
        pack.save(path)
        return {"ui": {"text": [f"saved {path}"]}, "result": (path,)}


def target_path(node: str, folder: str, name: str, overwrite: bool) -> str:
    """A safe path for `name` inside `folder`; refuses to replace an existing file unless asked."""
    stem = os.path.basename(name.strip()).removesuffix(".safetensors")
    if not stem or stem.startswith("."):
        raise SafeRoPEInputError(node, "name", f"'{name}' is not a usable file name", "Type a name like 'nudity'")
    path = os.path.join(folder, f"{stem}.safetensors")
    if os.path.exists(path) and not overwrite:
        raise SafeRoPEInputError(node, "name", f"{path} already exists", "Pick another name or enable overwrite")
    return path


class SaveStatistics:
    DESCRIPTION = "Writes collected statistics to models/saferope_statistics/<name>.safetensors."
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    NODE = "Save Statistics"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"statistics": ("SAFEROPE_STATS",), "name": ("STRING", {"default": "my_statistics"}),
                             "overwrite": ("BOOLEAN", {"default": False})}}

    def save(self, statistics: QKStatistics, name, overwrite):
        path = target_path(self.NODE, model_files.output_dir(STATS_FOLDER), name, overwrite)
        statistics.save(path)
        return {"ui": {"text": [f"saved {path}"]}, "result": (path,)}


class LoadStatistics:
    DESCRIPTION = "Loads statistics saved by Save Statistics."
    CATEGORY = "SafeRoPE/Collect & Train"
    RETURN_TYPES = ("SAFEROPE_STATS",)
    FUNCTION = "load"
    NODE = "Load Statistics"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (folder_paths.get_filename_list(STATS_FOLDER),)}}

    def load(self, name):
        try:
            return (QKStatistics.load(folder_paths.get_full_path_or_raise(STATS_FOLDER, name)),)
        except ValueError as err:
            raise SafeRoPEInputError(self.NODE, "name", str(err), "Re-run Collect Q/K and save again") from None
