"""Collect & Train, first half: prompt set -> collected q/k statistics -> subspaces and safety-critical heads.

Build Subspaces outputs an untrained pack (bases, selected heads, delta table, rotations at zero), so subspaces
are saved and loaded with the pack nodes and there is one file format for both.
"""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..saferope_comfy.editors import QKCollector
from ..saferope_comfy.flux_adapter import with_qk_editor
from ..saferope_comfy.model_calls import context_token_ids, latent_shape, model_inputs, run_prompts
from ..saferope_comfy.model_files import STATS_FOLDER
from ..saferope_core import (
    PromptSet,
    PromptSetError,
    QKStatistics,
    SafeRoPEPack,
    StatisticsError,
    build_subspaces,
    build_unsafe_prompts,
    clean_lines,
    locate_subjects,
)
from ..saferope_core.prompts import (
    content_span,
    default_concepts,
    default_lists,
    parse_anchors,
    read_prompt_file,
)
from ..saferope_core.statistics import STATISTICS_KIND
from .common import (
    Pack,
    Prompts,
    Statistics,
    checked,
    input_path,
    parse_sigmas,
    require_flux,
    seed_input,
    sigmas_input,
    size_inputs,
    validation,
)
from .errors import SafeRoPEInputError
from .file_nodes import LoadFileNode, SaveFileNode

CATEGORY = "SafeRoPE/Collect & Train"
CUSTOM = "custom"


class SafeRoPEPromptSet(io.ComfyNode):
    NODE = "SafeRoPE Prompt Set"

    @classmethod
    def define_schema(cls):
        def lines(name, tooltip):
            return io.String.Input(name, default="", multiline=True, tooltip=tooltip)

        return io.Schema(
            node_id="SafeRoPEPromptSet",
            display_name=cls.NODE,
            category=CATEGORY,
            description="Builds the prompts a pack is made from: unsafe prompts (subject x modifier x template, the "
            "subject marked) and safe prompts. Pick a shipped concept, or 'custom' and type your own "
            "lists; an empty box uses the chosen concept's shipped list.",
            inputs=[
                io.Combo.Input(
                    "concept",
                    options=[*default_concepts(), CUSTOM],
                    default="nudity",
                    tooltip="A concept with shipped lists, or 'custom' to type every list yourself",
                ),
                lines("subjects", "What the pack erases: trigger phrases, one per line (empty: the shipped list)"),
                lines("modifiers", "Words that vary the unsafe prompts, one per line (empty: the shipped list)"),
                lines(
                    "templates",
                    "Prompt templates, one per line, each with {subject} and optionally {modifier} "
                    "(empty: the shipped list)",
                ),
                lines("safe_prompts", "Prompts the pack must leave unchanged, one per line (empty: the shipped list)"),
                io.Int.Input(
                    "max_unsafe",
                    default=200,
                    min=1,
                    max=100000,
                    tooltip="How many subject x modifier x template prompts to sample",
                ),
                io.Int.Input("max_safe", default=200, min=1, max=100000, tooltip="How many safe prompts to keep"),
                seed_input("Which unsafe prompts are sampled (and which safe ones, above max_safe)"),
                io.String.Input(
                    "safe_prompt_file",
                    default="",
                    optional=True,
                    tooltip="Optional: a .txt (one prompt per line) or .csv (column 'prompt', 'caption' "
                    "or 'text') file of more safe prompts, in ComfyUI's input folder",
                ),
                io.String.Input(
                    "concept_name",
                    default="",
                    optional=True,
                    tooltip="The concept's name stored in the pack (empty: the concept chosen above)",
                ),
                io.String.Input(
                    "anchors",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip="What to draw instead: 'subject: safe counterpart' per line (e.g. 'nude woman: clothed "
                    "woman'), or one line for every subject; a subject without one is left out of its prompt. "
                    "Empty: the chosen concept's shipped anchors",
                ),
            ],
            outputs=[
                Prompts.Output(
                    "prompts",
                    display_name="prompts",
                    tooltip="For Collect Q/K, Train Risk Rotations and Collect UVR Anchors",
                ),
                io.String.Output(
                    "summary",
                    display_name="summary",
                    tooltip="How many prompts of each kind, and the first unsafe one with its anchor",
                ),
            ],
        )

    @classmethod
    @checked
    def execute(
        cls,
        concept,
        subjects,
        modifiers,
        templates,
        safe_prompts,
        max_unsafe,
        max_safe,
        seed,
        safe_prompt_file="",
        concept_name="",
        anchors="",
    ) -> io.NodeOutput:
        defaults = default_lists(concept) if concept != CUSTOM else {}
        lists = {}
        for name, text in (
            ("subjects", subjects),
            ("modifiers", modifiers),
            ("templates", templates),
            ("safe_prompts", safe_prompts),
        ):
            lists[name] = clean_lines(text) or defaults.get("safe" if name == "safe_prompts" else name, [])
        for name in ("subjects", "templates"):
            if not lists[name]:
                raise SafeRoPEInputError(
                    cls.NODE, name, "the list is empty", "Type one entry per line, or choose a shipped concept"
                )
        if not any("{subject}" in t for t in lists["templates"]):
            raise SafeRoPEInputError(
                cls.NODE,
                "templates",
                "no template contains {subject}",
                "Write templates like 'a photo of {subject}, {modifier}'",
            )
        safe = list(lists["safe_prompts"])
        if safe_prompt_file.strip():
            path = input_path(cls.NODE, "safe_prompt_file", safe_prompt_file.strip())
            try:
                safe += read_prompt_file(path, limit=max_safe)
            except PromptSetError as err:
                raise SafeRoPEInputError(cls.NODE, "safe_prompt_file", str(err), "Give a .txt or .csv file") from None
        if not safe:
            raise SafeRoPEInputError(cls.NODE, "safe_prompts", "no safe prompts", "Type some, or give safe_prompt_file")
        try:
            safe_counterparts = (
                parse_anchors(anchors, lists["subjects"])
                if anchors.strip()
                else {subject: defaults.get("anchors", {}).get(subject, "") for subject in lists["subjects"]}
            )
        except PromptSetError as err:
            raise SafeRoPEInputError(cls.NODE, "anchors", str(err), "Write 'subject: anchor' lines") from None
        unsafe = build_unsafe_prompts(
            lists["subjects"], lists["modifiers"], lists["templates"], max_unsafe, seed, safe_counterparts
        )
        if len(safe) > max_safe:
            safe = [
                safe[i]
                for i in sorted(
                    torch.randperm(len(safe), generator=torch.Generator().manual_seed(seed))[:max_safe].tolist()
                )
            ]
        prompts = PromptSet(concept_name.strip() or concept, unsafe, safe)
        summary = (
            f"concept '{prompts.concept}': {len(unsafe)} unsafe prompts from {len(lists['subjects'])} subjects, "
            f"{len(safe)} safe prompts\nfirst: {unsafe[0].text}\nits anchor (drawn instead): {unsafe[0].anchor or '-'}"
        )
        return io.NodeOutput(prompts, summary)


class CollectQK(io.ComfyNode):
    NODE = "Collect Q/K"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CollectQK",
            display_name=cls.NODE,
            category=CATEGORY,
            description="Runs the model on each prompt (from noise, at the given sigmas) and accumulates, per block "
            "and head, the queries and keys of the unsafe prompts' subject tokens and of the safe "
            "prompts' tokens. Memory does not grow with the number of prompts; split long runs and merge "
            "them with Merge Statistics.",
            inputs=[
                io.Model.Input("model", tooltip="The model the pack is for (packs do not transfer between families)"),
                io.Clip.Input("clip", tooltip="That model's text encoder, as for CLIP Text Encode"),
                Prompts.Input("prompts", tooltip="From SafeRoPE Prompt Set"),
                sigmas_input("1.0, 0.8, 0.6", "Noise levels the model is run at, comma separated (1.0 = pure noise)"),
                *size_inputs("the model is run at"),
                seed_input("Seed of the noise the model is run on"),
                io.Int.Input(
                    "reservoir_size",
                    default=1024,
                    min=16,
                    max=65536,
                    tooltip="Vectors kept per block and stream for head selection; more is steadier",
                ),
            ],
            outputs=[
                Statistics.Output(
                    "statistics",
                    display_name="statistics",
                    tooltip="For Build Subspaces, Save Statistics or Merge Statistics",
                ),
                io.String.Output(
                    "report", display_name="report", tooltip="In how many prompts the subject's tokens were found"
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, sigmas=None):
        return validation(cls.NODE, "sigmas", sigmas, lambda text: parse_sigmas(text, cls.NODE))

    @classmethod
    @checked
    def execute(cls, model, clip, prompts: PromptSet, sigmas, width, height, seed, reservoir_size) -> io.NodeOutput:
        shape = require_flux(cls.NODE, model)
        sigma_list = parse_sigmas(sigmas, cls.NODE)

        def tokenize(text):
            return context_token_ids(clip, text)

        location = locate_subjects(prompts.unsafe, tokenize)
        if not location.found:
            raise SafeRoPEInputError(
                cls.NODE,
                "prompts",
                "the subject was not found in the tokens of any prompt\n" + location.report(prompts.unsafe),
                "Check the subjects and templates",
            )
        empty = tokenize("")
        jobs = [("unsafe", prompts.unsafe[i].text, pos) for i, pos in sorted(location.found.items())]
        jobs += [("safe", text, None) for text in prompts.safe]
        stats = QKStatistics(shape, reservoir_size, seed, [prompts.concept])
        collector = QKCollector(stats)
        patched = with_qk_editor(model, collector)

        def aim(index, prompt, noise) -> bool:
            group, _, positions = jobs[index]
            if positions is None:  # a safe prompt: every content token
                positions = list(range(*content_span(prompt.token_ids, empty)))
            context = model_inputs(patched, prompt, noise)["c_crossattn"]
            positions = prompt.context_positions(positions, context)
            if positions:
                collector.target(group, positions)
            return bool(positions)

        size = latent_shape(patched, width, height)
        run_prompts(patched, clip, [text for _, text, _ in jobs], sigma_list, size, seed, aim)
        collector.target(None)
        report = (
            location.report(prompts.unsafe) + f"\n{len(prompts.safe)} safe prompts; "
            f"{len(sigma_list)} sigmas; statistics use {stats.nbytes() / 2**20:.1f} MiB"
        )
        return io.NodeOutput(stats, report)


class MergeStatistics(io.ComfyNode):
    NODE = "Merge Statistics"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MergeStatistics",
            display_name=cls.NODE,
            category=CATEGORY,
            description="Adds two collections of the same model (e.g. from different sessions or machines) into "
            "one, as if they had been collected in one run.",
            inputs=[
                Statistics.Input("a", tooltip="Statistics from Collect Q/K or Load Statistics"),
                Statistics.Input("b", tooltip="More statistics of the same model"),
            ],
            outputs=[Statistics.Output(tooltip="Both collections in one")],
        )

    @classmethod
    @checked
    def execute(cls, a, b) -> io.NodeOutput:
        try:
            return io.NodeOutput(a.merged(b))
        except StatisticsError as err:
            raise SafeRoPEInputError(cls.NODE, "b", str(err), "Merge statistics collected on the same model") from None


class BuildSubspaces(io.ComfyNode):
    NODE = "Build Subspaces"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BuildSubspaces",
            display_name=cls.NODE,
            category=CATEGORY,
            description="Computes each head's unsafe subspace (rank r) and keeps the safety-critical heads: those "
            "whose risk score separates unsafe from safe vectors (delta >= hds_threshold). Outputs an "
            "untrained pack (rotations zero) for Train Risk Rotations, and a summary.",
            inputs=[
                Statistics.Input("statistics", tooltip="From Collect Q/K, Merge Statistics or Load Statistics"),
                io.Int.Input(
                    "rank",
                    default=5,
                    min=1,
                    max=64,
                    tooltip="Dimensions of each unsafe subspace (the paper's best: 5; 2 under-erases, 10 "
                    "hurts other content)",
                ),
                io.Float.Input(
                    "lrs_threshold",
                    default=0.7,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="A vector counts as risky when this share of it lies in the subspace",
                ),
                io.Float.Input(
                    "hds_threshold",
                    default=0.5,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Keep heads where unsafe vectors are risky this much more often than safe "
                    "ones (delta); lower it if no head passes",
                ),
            ],
            outputs=[
                Pack.Output(
                    "subspaces",
                    display_name="subspaces",
                    tooltip="An untrained pack: for Train Risk Rotations or Save SafeRoPE Pack",
                ),
                io.String.Output(
                    "summary", display_name="summary", tooltip="Heads kept per block and the spread of delta"
                ),
            ],
        )

    @classmethod
    @checked
    def execute(cls, statistics: QKStatistics, rank, lrs_threshold, hds_threshold) -> io.NodeOutput:
        if rank > statistics.shape.head_dim:
            raise SafeRoPEInputError(
                cls.NODE,
                "rank",
                f"rank {rank} is larger than the head dimension {statistics.shape.head_dim}",
                "Use a rank like 2-10 (the paper uses 5)",
            )
        if not statistics.sites("unsafe"):
            raise SafeRoPEInputError(
                cls.NODE, "statistics", "no unsafe vectors were collected", "Run Collect Q/K with unsafe prompts"
            )
        try:
            subspaces = build_subspaces(statistics, rank, lrs_threshold, hds_threshold)
        except StatisticsError as err:
            raise SafeRoPEInputError(cls.NODE, "rank", str(err)) from None
        summary = subspaces.summary(statistics.shape.block_names())
        if not subspaces.selected.any():
            best = float(subspaces.delta.max())
            raise SafeRoPEInputError(
                cls.NODE,
                "hds_threshold",
                f"no head reached delta >= {hds_threshold} (best delta {best:.2f})\n" + summary,
                f"Lower hds_threshold (e.g. to {max(best - 0.05, 0):.2f}), lower lrs_threshold, raise the "
                "rank, or collect more unsafe prompts",
            )
        concepts = statistics.concepts or ["concept"]
        pack = SafeRoPEPack.from_subspaces(subspaces, statistics.shape, concepts, name="+".join(concepts))
        return io.NodeOutput(pack, summary)


class SaveSafeRoPEPack(SaveFileNode):
    NODE, NODE_ID, CATEGORY = "Save SafeRoPE Pack", "SaveSafeRoPEPack", "SafeRoPE"
    DESCRIPTION = (
        "Writes a pack (trained, or untrained subspaces) to models/saferope/<name>.safetensors, where Load SafeRoPE "
        "Pack finds it."
    )
    CONTENT = Pack.Input("pack", tooltip="From Train Risk Rotations (or Build Subspaces)")
    DEFAULT_NAME, WHAT = "my_pack", "pack"

    @classmethod
    @checked
    def execute(cls, pack: SafeRoPEPack, name, overwrite) -> io.NodeOutput:
        return cls.save(pack, name, overwrite)


class SaveStatistics(SaveFileNode):
    NODE, NODE_ID, CATEGORY, FOLDER = "Save Statistics", "SaveStatistics", CATEGORY, STATS_FOLDER
    DESCRIPTION = (
        "Writes collected statistics to models/saferope_statistics/<name>.safetensors, to build subspaces later or "
        "merge with another collection."
    )
    CONTENT = Statistics.Input("statistics", tooltip="From Collect Q/K or Merge Statistics")
    DEFAULT_NAME, WHAT = "my_statistics", "statistics"

    @classmethod
    @checked
    def execute(cls, statistics: QKStatistics, name, overwrite) -> io.NodeOutput:
        return cls.save(statistics, name, overwrite)


class LoadStatistics(LoadFileNode):
    NODE, NODE_ID, CATEGORY = "Load Statistics", "LoadStatistics", CATEGORY
    DESCRIPTION = "Loads statistics saved by Save Statistics from models/saferope_statistics."
    KIND, FOLDERS = STATISTICS_KIND, (STATS_FOLDER,)
    NAME_TOOLTIP = "A statistics file in ComfyUI/models/saferope_statistics"
    OUTPUTS = [Statistics.Output(tooltip="For Build Subspaces or Merge Statistics")]
    NONE_CHOSEN = (
        "no statistics file chosen",
        "Save statistics with Save Statistics (they go to models/saferope_statistics)",
    )
    ERROR, REMAKE = StatisticsError, "Re-run Collect Q/K and save again"

    @classmethod
    def read(cls, path):
        return QKStatistics.load(path)
