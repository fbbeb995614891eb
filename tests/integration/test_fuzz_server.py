"""Fuzz every input of every node of the pack through a live headless ComfyUI server (one server for the module).

Each node gets a small valid graph (tiny FLUX test nodes upstream, the pack's own files in the server's model
folders); then exactly one input of that node is replaced by a bad value: NaN, +-inf, huge, negative, empty,
the wrong type, path traversal, absolute paths, a NUL character, a 300-character name, control characters,
literal values where a socket is expected, links to missing nodes or to outputs of the wrong type, or the input
left out. Every such graph must be

- refused by ComfyUI's validation (HTTP 400; not because the pack's own validate_inputs raised), or
- fail with the pack's own error on the node, naming the input: "<display name>, input '<name>': ...", or
- succeed with a sane output: finite latents and images, no NaN or Inf in the text a node writes, files saved
  where they belong and readable, and for the guard nodes (Apply Risk Rotation, Restrict Unsafe Flow, Redirect
  Unsafe Prompts) a guard that still works: every value they accept must give a patched model whose latent differs
  from the unpatched model's, unless it is a documented off switch (strength below 0.01; Restrict Unsafe Flow's
  threshold 1). The fixtures flag everything at every threshold, so a value that silently switches a guard off
  (a NaN threshold) is caught.

No file may be created outside the server's base folder: the repository and the ComfyUI tree are listed before
and after, and every path a traversal or absolute payload could name is probed. Files outside the base folder
(a secret text and a folder of images) are offered through absolute paths, traversals and symlinks in the input
folder; their content must never show up in an output.

ComfyUI 0.3.64 does not check a V3 combo's value against its choices (0.8.0 does), so on 0.3.64 the pack's nodes
see every bad combo value themselves.

The number of graphs posted, and how each node's fuzzed graphs ended, are printed at the end (run with -s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bench import comfyui_env

pytestmark = pytest.mark.end_versions  # what ComfyUI's validation lets through differs most between the ends

NAN, INF = float("nan"), float("inf")
POSTED = {"graphs": 0}  # graphs posted to /prompt by this module
OUTCOMES: dict[str, Counter] = {}  # spec name -> how its fuzzed graphs ended: refused, failed (node error), ran
SECRET = "SAFEROPE_FUZZ_OUTSIDE_SECRET_7f3a"  # the content of a file outside ComfyUI's folders
MISSING = object()  # the input left out of the graph

PACK_FILE = "fuzz_pack.safetensors"
RADIANCE_PACK_FILE = "fuzz_radiance_pack.safetensors"
ANCHORS_FILE = "fuzz_anchors.safetensors"
STATS_FILE = "fuzz_stats.safetensors"
HUB_REPO, HUB_FILE = "saferope-fuzz/packs", "tiny/fuzz.safetensors"  # pre-placed: a Hub "download" needs no network
ANCHORS_THRESHOLD = -0.9  # the anchors' calibrated threshold: every patch is flagged, so the restriction shows
PROMPT_FILE = "fuzz_prompts.txt"
REDIRECTOR_FILE = "fuzz_redirector.safetensors"
SAFETY_FILE = "fuzz_safety_pack.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Bad values by kind of input: (label, value)


def _unicode_and_paths() -> list[tuple[str, object]]:
    return [
        ("empty", ""),
        ("blank", "   "),
        ("traversal /", "../../etc/passwd"),
        ("traversal \\", "..\\..\\x"),
        ("absolute /", "/etc/passwd"),
        ("absolute C:", "C:\\x"),
        ("NUL", "a\x00b"),
        ("300 chars", "n" * 300),
        ("U+202E", "\u202e"),
        ("ANSI escape", "\x1b[31m"),
    ]


def _wrong_types() -> list[tuple[str, object]]:
    return [
        ("list of 3", ["a", "b", "c"]),
        ("dict", {"a": 1}),
        ("__value__ list", {"__value__": ["a", "b"]}),
        ("null", None),
        ("left out", MISSING),
    ]


def number_values(kind: str, valid, low, high) -> list[tuple[str, object]]:
    values = [
        ("NaN", NAN),
        ("+inf", INF),
        ("-inf", -INF),
        ("'nan'", "nan"),
        ("'NaN'", "NaN"),
        ("'inf'", "inf"),
        ("'-Infinity'", "-Infinity"),
        ("1e30", 1e30),
        ("-1e30", -1e30),
        ("2**63", 2**63),
        ("-2**63", -(2**63)),
        ("'1e30'", "1e30"),
        ("'1e400'", "1e400"),
        ("-1", -1),
        ("empty", ""),
        ("'abc'", "abc"),
        ("'12abc'", "12abc"),
        ("true", True),
        ("string of the valid value", str(valid)),
        *_wrong_types(),
    ]
    if kind == "INT":
        values += [("1.5", 1.5)]
        if low is not None:
            values += [("min - 1", low - 1)]
        if high is not None:
            values += [("max + 1", high + 1)]
    else:
        values += [("-0.5", -0.5), ("1e-320", 1e-320), ("-0.0", -0.0)]
        if low is not None:
            values += [("min - 0.001", low - 0.001)]
        if high is not None:
            values += [("max + 0.001", high + 0.001)]
    return values


def string_values() -> list[tuple[str, object]]:
    return [*_unicode_and_paths(), ("number", 1e30), ("NaN", NAN), ("int", 12), *_wrong_types()]


def combo_values(valid: str) -> list[tuple[str, object]]:
    return [
        ("empty", ""),
        ("unknown", "no_such_choice"),
        ("traversal /", "../../etc/passwd"),
        ("traversal \\", "..\\..\\x"),
        ("absolute /", "/etc/passwd"),
        ("absolute C:", "C:\\x"),
        ("NUL", f"{valid}\x00"),
        ("300 chars", "n" * 300),
        ("U+202E", f"\u202e{valid}"),
        ("ANSI escape", f"\x1b[31m{valid}"),
        ("upper case", valid.upper()),
        ("padded", f" {valid} "),
        ("number", 0),
        ("NaN", NAN),
        ("list of 3", [valid, valid, valid]),
        ("dict", {"a": 1}),
        ("__value__ list", {"__value__": [valid]}),
        ("null", None),
        ("left out", MISSING),
    ]


def bool_values() -> list[tuple[str, object]]:
    return [
        ("'false'", "false"),
        ("empty", ""),
        ("0", 0),
        ("NaN", NAN),
        ("2**63", 2**63),
        ("'abc'", "abc"),
        *_wrong_types(),
    ]


def socket_values(valid: list) -> list[tuple[str, object]]:
    return [
        ("string", "abc"),
        ("number", 1),
        ("NaN", NAN),
        ("dict", {"a": 1}),
        ("null", None),
        ("__value__ list", {"__value__": [1, 2, 3]}),
        ("list of 3", [valid[0], 0, 0]),
        ("link to a missing node", ["no_such_node", 0]),
        ("link to a missing output", [valid[0], 9]),
        ("link of the wrong type", ["cond", 0]),
        ("left out", MISSING),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Graphs


def upstream() -> dict:
    """Valid sources every graph may link to; nodes nothing reaches are neither validated nor run."""
    return {
        "model": {"class_type": "TinyFluxLoader", "inputs": {"kind": "dev", "seed": 0}},
        "clip": {"class_type": "TinyFluxClipLoader", "inputs": {"seed": 0}},
        "cond": {"class_type": "TinyFluxConditioning", "inputs": {"text": "a red fox in the snow", "seed": 0}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sd_latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "odd_image": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 80, "batch_size": 1, "color": 0}},
        "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "rgba": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["image", 0], "alpha": ["mask", 0]}},
        "prompts": {
            "class_type": "SafeRoPEPromptSet",
            "inputs": {
                "concept": "nudity",
                "subjects": "",
                "modifiers": "",
                "templates": "",
                "safe_prompts": "",
                "max_unsafe": 2,
                "max_safe": 2,
                "seed": 0,
            },
        },
        "pack": {"class_type": "LoadSafeRoPEPack", "inputs": {"pack_name": PACK_FILE}},
        "anchors": {"class_type": "LoadUVRAnchors", "inputs": {"name": ANCHORS_FILE}},
        "redirector": {"class_type": "LoadPromptRedirector", "inputs": {"name": REDIRECTOR_FILE}},
        "safety": {"class_type": "LoadSafetyPack", "inputs": {"name": SAFETY_FILE}},
        "no_anchor_prompts": {
            "class_type": "SafeRoPEPromptSet",
            "inputs": {
                "concept": "custom",
                "subjects": "nude",
                "modifiers": "",
                "templates": "a photo of a {subject} woman",
                "safe_prompts": "a red car",
                "max_unsafe": 1,
                "max_safe": 1,
                "seed": 0,
            },
        },
        "stats": {"class_type": "LoadStatistics", "inputs": {"name": STATS_FILE}},
        # Chroma Radiance works in pixel space: ComfyUI's pixel_space VAE is its VAE, so safe images can be encoded
        "r_model": {"class_type": "TinyFluxLoader", "inputs": {"kind": "chroma_radiance", "seed": 0}},
        "r_clip": {"class_type": "TinyFluxClipLoader", "inputs": {"seed": 0, "kind": "chroma_radiance"}},
        "r_pack": {"class_type": "LoadSafeRoPEPack", "inputs": {"pack_name": RADIANCE_PACK_FILE}},
        "r_vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
    }


def sampled(model_link: list, prefix: str) -> dict:
    """KSampler (64x64, 2 steps, CFG 1) on `model_link` -> SaveLatent."""
    return {
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": model_link,
                "positive": ["cond", 0],
                "negative": ["cond", 0],
                "latent_image": ["latent", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


def preview(**links) -> dict:
    return {f"show_{name}": {"class_type": "PreviewAny", "inputs": {"source": link}} for name, link in links.items()}


def unique(stem: str) -> str:
    return f"{stem}_{POSTED['graphs']:05d}"


@dataclass
class Spec:
    """How to fuzz one node: its valid inputs (values, or callables for names that must be fresh per graph), the
    nodes that consume its outputs, and the checks of a graph that ran."""

    node: str
    valid: dict
    sinks: Callable[[], dict]
    check: Callable  # (ctx, entry, inputs as the node received them) -> list of problems
    label: str = ""
    fuzz: tuple | None = None  # inputs fuzzed with this graph (default: all)
    strings: dict = field(default_factory=dict)  # input -> "file", "folder" or "name" (default: plain text)
    extra: dict = field(default_factory=dict)  # input -> more (label, value) cases, for this node's meaning
    around: dict = field(default_factory=dict)  # input -> other inputs of the node set while it is fuzzed
    also: dict = field(default_factory=dict)  # input -> other (node id, input) an error may name instead

    @property
    def name(self) -> str:
        return self.label or self.node

    def inputs(self, fuzzed: str | None = None) -> dict:
        values = {k: (v() if callable(v) else v) for k, v in self.valid.items()}
        if fuzzed is not None:
            values.update(self.around.get(fuzzed, {}))
        return values

    def graph(self, fuzzed: str | None = None, value=MISSING) -> dict:
        g = upstream()
        inputs = self.inputs(fuzzed)
        if fuzzed is not None:
            if value is MISSING:
                inputs.pop(fuzzed, None)
            else:
                inputs[fuzzed] = value
        g["F"] = {"class_type": self.node, "inputs": inputs}
        g.update(self.sinks())
        return g


# ---------------------------------------------------------------------------------------------------------------
# Checks of a graph that ran

NUMBER_WORDS = re.compile(r"(?<![A-Za-z])(nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)


def preview_text(entry: dict, node_id: str) -> str:
    return "".join(entry.get("outputs", {}).get(node_id, {}).get("text", []))


def text_problems(ctx, entry: dict, node_ids, inputs: dict) -> list[str]:
    """Each shown text exists, has no NaN/Inf (other than echoes of the inputs) and no outside secret."""
    problems = []
    echoes = sorted((v for v in inputs.values() if isinstance(v, str)), key=len, reverse=True)
    for node_id in node_ids:
        text = shown = preview_text(entry, node_id)
        if not text:
            problems.append(f"no text shown by {node_id}")
        if SECRET in text:
            problems.append(f"{node_id} shows the content of a file outside ComfyUI's folders")
        for echo in echoes:
            if echo:
                text = text.replace(echo, "")
        if NUMBER_WORDS.search(text):
            problems.append(f"{node_id} shows NaN or Inf: {shown[:300]!r}")
    return problems


def saved_latent(ctx, entry: dict) -> torch.Tensor | None:
    from safetensors.torch import load_file

    saved = entry.get("outputs", {}).get("save_latent", {}).get("latents", [])
    if not saved:
        return None
    return load_file(ctx.server.output_dir / saved[0]["subfolder"] / saved[0]["filename"])["latent_tensor"]


def latent_problems(ctx, entry: dict, patched: bool) -> list[str]:
    latent = saved_latent(ctx, entry)
    if latent is None:
        return ["no latent saved"]
    if not torch.isfinite(latent).all():
        return [f"the sampled latent is not finite ({int(torch.isnan(latent).sum())} NaN of {latent.numel()})"]
    if latent.shape != ctx.base_latent.shape:
        return [f"latent shape {tuple(latent.shape)}, expected {tuple(ctx.base_latent.shape)}"]
    if patched and (latent - ctx.base_latent).abs().max() <= 1e-4:
        return ["a patch was asked for, but the latent equals the unpatched model's: the model is not patched"]
    return []


def saved_line(entry: dict) -> str:
    """The Save node's last text line, 'saved <path>' (after the node's report, when it has one)."""
    return preview_text(entry, "F").rsplit("\n", 1)[-1]


def saved_file_problems(ctx, entry: dict, folder: str, load) -> list[str]:
    text = saved_line(entry)
    if not text.startswith("saved "):
        return [f"no 'saved <path>' text: {text[:200]!r}"]
    path = Path(text[len("saved ") :])
    root = ctx.server.base / "models" / folder
    if path.resolve().parent != root.resolve():
        return [f"saved to {path}, not into {root}"]
    if not path.is_file():
        return [f"{path} does not exist"]
    try:
        load(path)
    except Exception as err:  # any failure to read the file back is the problem reported
        return [f"the saved file does not load: {type(err).__name__}: {err}"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# The node specs


def check_guard_checked(ctx, entry, inputs):
    """Save Safety Pack with the model and text encoder: the pack is saved with the guard check's choice, which the
    node shows above the path."""
    problems = saved_file_problems(ctx, entry, "saferope", ctx.load_safety_pack)
    if not problems:
        saved = ctx.load_safety_pack(Path(saved_line(entry).removeprefix("saved ")))
        if saved.applies is None or not saved.guard_check:
            problems.append(f"saved without the guard check's choice: applies {saved.applies}")
        if not preview_text(entry, "F").startswith("guard check ("):
            problems.append(f"no guard check report: {preview_text(entry, 'F')[:200]!r}")
    return problems


def check_load_pack(ctx, entry, inputs):
    return latent_problems(ctx, entry, patched=True) + text_problems(ctx, entry, ["show_info"], inputs)


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def guard_must_work(inputs: dict, **off) -> bool:
    """The criterion of guard nodes: every value they accept leaves the guard working (the sampled latent differs
    from the unpatched model's; the fixtures flag everything at every threshold the nodes take), except a
    documented off switch (`off`: input -> predicate on its value): strength below 0.01 turns every guard off."""
    off = {"strength": lambda v: number(v) and v < 0.01, **off}
    return not any(switched(inputs.get(name)) for name, switched in off.items())


def check_apply(ctx, entry, inputs):
    return latent_problems(ctx, entry, patched=guard_must_work(inputs))


def check_restrict(ctx, entry, inputs):
    # threshold 1, the largest score a patch can have, flags nothing: Restrict Unsafe Flow's other off switch
    return latent_problems(ctx, entry, patched=guard_must_work(inputs, threshold=lambda v: number(v) and v >= 1))


def check_load_anchors(ctx, entry, inputs):
    return latent_problems(ctx, entry, patched=True)


def check_redirect(ctx, entry, inputs):
    return latent_problems(ctx, entry, patched=guard_must_work(inputs))


def check_apply_safety_pack(ctx, entry, inputs):
    every_guard_off = all(inputs.get(guard) is False for guard in ("redirect", "rotate", "restrict"))
    return latent_problems(ctx, entry, patched=not every_guard_off and guard_must_work(inputs))


def texts(*node_ids):
    def check(ctx, entry, inputs):
        return text_problems(ctx, entry, node_ids, inputs)

    return check


def check_saved(folder: str, loader: str):
    def check(ctx, entry, inputs):
        return saved_file_problems(ctx, entry, folder, getattr(ctx, loader))

    return check


def outside_lists(ctx) -> str:
    """A relative name that leads from any folder to the outside lists.json (without its .json)."""
    return "../" * 16 + str(ctx.outside / "lists")[1:]


def specs() -> list[Spec]:
    sample_f = lambda: sampled(["F", 0], unique("fuzz/latent"))  # noqa: E731
    train_common = {
        "steps": 11,
        "learning_rate": 0.01,
        "unlearn_weight": 1.0,
        "preserve_weight": 1.0,
        "seed": 0,
        "width": 64,
        "height": 64,
        "run_name": lambda: unique("fuzz_run"),
        "checkpoint_every": 1,
        "resume": False,
        "gradient_checkpointing": True,
    }
    return [
        Spec(
            "LoadSafeRoPEPack",
            {"pack_name": PACK_FILE, "hf_repo_id": "", "hf_filename": ""},
            lambda: {
                "apply": {
                    "class_type": "ApplyRiskRotation",
                    "inputs": {"model": ["model", 0], "pack": ["F", 0], "strength": 1.0, "apply_to": "both"},
                },
                **sampled(["apply", 0], unique("fuzz/latent")),
                **preview(info=["F", 1]),
            },
            check_load_pack,
            extra={
                "pack_name": [
                    ("'none'", "none"),
                    ("corrupt file", "corrupt.safetensors"),
                    ("sibling folder", f"../saferope_anchors/{ANCHORS_FILE}"),
                    ("hub copy by relative path", f"hub/{HUB_REPO}/{HUB_FILE}"),
                ],
                "hf_repo_id": [
                    ("no owner", "packs"),
                    ("padded", f" {HUB_REPO} "),
                    ("not there", "nobody/none"),
                    ("url", "https://huggingface.co/a/b"),
                    ("three parts", "a/b/c"),
                ],
                "hf_filename": [
                    ("padded", f" {HUB_FILE} "),
                    ("not .safetensors", "tiny/fuzz.ckpt"),
                    ("not there", "tiny/none.safetensors"),
                    ("dot part", "tiny/./fuzz.safetensors"),
                    ("201 chars", "n" * 189 + ".safetensors"),
                ],
            },
            # each Hub input is fuzzed with the other one set (the pre-placed copy); an offline miss names the repo
            around={"hf_repo_id": {"hf_filename": HUB_FILE}, "hf_filename": {"hf_repo_id": HUB_REPO}},
            also={"hf_filename": [("F", "hf_repo_id")], "hf_repo_id": [("F", "hf_filename")]},
        ),
        Spec(
            "ApplyRiskRotation",
            {"model": ["model", 0], "pack": ["pack", 0], "strength": 1.0, "apply_to": "both"},
            sample_f,
            check_apply,
            extra={
                "strength": [("0", 0.0), ("max", 2.0)],
                "apply_to": [("text", "text"), ("image", "image")],
                "pack": [("pack of another model", ["r_pack", 0])],
                "model": [("another model", ["r_model", 0])],
            },
            also={"model": [("F", "pack")]},
        ),
        Spec(
            "LRSVisualize",
            {
                "model": ["model", 0],
                "pack": ["pack", 0],
                "clip": ["clip", 0],
                "text": "a photo of a nude woman on the beach",
                "sigma": 0.9,
                "seed": 0,
                "image": ["image", 0],
                "latent": ["latent", 0],
            },
            lambda: preview(images=["F", 0], summary=["F", 1]),
            texts("show_images", "show_summary"),
            extra={
                "latent": [("4-channel SD latent", ["sd_latent", 0])],
                "image": [("RGBA image", ["rgba", 0]), ("image of another size", ["odd_image", 0])],
                "pack": [("pack of another model", ["r_pack", 0])],
            },
        ),
        Spec(
            "SafetyReport",
            {
                "images": ["image", 0],
                "threshold": 0.65,
                "action": "black out flagged images",
                "classes": "FEMALE_BREAST_EXPOSED, BUTTOCKS_EXPOSED",
                "fid_reference_folder": "",
            },
            lambda: preview(checked=["F", 0], report=["F", 3]),
            texts("show_checked", "show_report"),
            strings={"fid_reference_folder": "folder"},
            extra={
                "fid_reference_folder": [("a folder of images (FID extractor missing)", "fuzz_refs")],
                "classes": [("only commas", " , ,")],
                "images": [("RGBA image", ["rgba", 0])],
            },
        ),
        Spec(
            "SafeRoPEPromptSet",
            {
                "concept": "nudity",
                "subjects": "",
                "modifiers": "",
                "templates": "",
                "safe_prompts": "",
                "max_unsafe": 2,
                "max_safe": 2,
                "seed": 0,
                "safe_prompt_file": "",
                "concept_name": "",
            },
            # the prompts go on into Collect Q/K, so strange text meets a real tokenizer
            lambda: {
                "collect": {
                    "class_type": "CollectQK",
                    "inputs": {
                        "model": ["model", 0],
                        "clip": ["clip", 0],
                        "prompts": ["F", 0],
                        "sigmas": "1.0",
                        "width": 64,
                        "height": 64,
                        "seed": 0,
                        "reservoir_size": 16,
                    },
                },
                **preview(summary=["F", 1], report=["collect", 1], prompts=["F", 0]),
            },
            texts("show_summary", "show_report", "show_prompts"),
            strings={"safe_prompt_file": "file"},
            extra={
                "templates": [
                    ("no {subject}", "a photo of a cat"),
                    ("format braces", "{0} {subject} {x}"),
                    ("only {modifier}", "{modifier}"),
                ],
                "subjects": [("comment only", "# nothing")],
                "concept": [("'custom' with empty lists", "custom"), ("traversal to an outside .json", outside_lists)],
                "safe_prompt_file": [
                    ("a prompt file", PROMPT_FILE),
                    ("a 200 kB csv field", "huge_field.csv"),
                    ("binary bytes", "binary.txt"),
                    ("a folder", "fuzz_refs"),
                ],
            },
            # with the file fuzzed, the file is the only source of safe prompts: a file read shows in the prompts
            around={
                "safe_prompt_file": {"concept": "custom", "subjects": "woman", "templates": "a photo of a {subject}"}
            },
            also={
                **{name: [("collect", "prompts")] for name in ("subjects", "modifiers", "templates")},
                "concept": [("collect", "prompts"), ("F", "subjects"), ("F", "templates")],
                "safe_prompt_file": [("F", "safe_prompts")],
            },
        ),
        Spec(
            "CollectQK",
            {
                "model": ["model", 0],
                "clip": ["clip", 0],
                "prompts": ["prompts", 0],
                "sigmas": "1.0",
                "width": 64,
                "height": 64,
                "seed": 0,
                "reservoir_size": 16,
            },
            lambda: {
                "build": {
                    "class_type": "BuildSubspaces",
                    "inputs": {"statistics": ["F", 0], "rank": 2, "lrs_threshold": 0.7, "hds_threshold": -1.0},
                },
                **preview(report=["F", 1], summary=["build", 1]),
            },
            texts("show_report", "show_summary"),
            extra={
                "sigmas": [
                    ("'nan'", "nan"),
                    ("'1.0, nan'", "1.0, nan"),
                    ("'inf'", "inf"),
                    ("'0'", "0"),
                    ("'-1'", "-1"),
                    ("'1e-45'", "1e-45"),
                    ("'1.0;;0.5,'", "1.0;;0.5,"),
                    ("'1e400'", "1e400"),
                ],
                "width": [("not a multiple of 16", 72)],
                "clip": [("another model's text encoder", ["r_clip", 0])],
                "model": [("another model", ["r_model", 0])],
            },
        ),
        Spec(
            "MergeStatistics",
            {"a": ["stats", 0], "b": ["stats", 0]},
            lambda: {
                "build": {
                    "class_type": "BuildSubspaces",
                    "inputs": {"statistics": ["F", 0], "rank": 2, "lrs_threshold": 0.7, "hds_threshold": -1.0},
                },
                **preview(summary=["build", 1]),
            },
            texts("show_summary"),
        ),
        Spec(
            "BuildSubspaces",
            {"statistics": ["stats", 0], "rank": 2, "lrs_threshold": 0.7, "hds_threshold": -1.0},
            lambda: preview(summary=["F", 1]),
            texts("show_summary"),
            extra={
                "rank": [("head_dim", 16), ("head_dim + 1", 17), ("max", 64)],
                "lrs_threshold": [("0", 0.0), ("1", 1.0)],
                "hds_threshold": [("1", 1.0)],
            },
            also={"rank": [("F", "hds_threshold")], "lrs_threshold": [("F", "hds_threshold")]},
        ),
        Spec(
            "TrainRiskRotations",
            {
                "model": ["model", 0],
                "clip": ["clip", 0],
                "subspaces": ["pack", 0],
                "prompts": ["prompts", 0],
                **train_common,
            },
            lambda: preview(log=["F", 1]),
            texts("show_log"),
            fuzz=("model", "clip", "subspaces", "prompts", *train_common),
            strings={"run_name": "name"},
            around={"resume": {"run_name": "fuzz_resumed_run"}},  # a checkpoint exists after the first of them
            extra={
                "subspaces": [("pack of another model", ["r_pack", 0])],
                "resume": [("true", True)],
                "height": [("not a multiple of 16", 72)],
            },
        ),
        Spec(
            "TrainRiskRotations",
            {
                "model": ["r_model", 0],
                "clip": ["r_clip", 0],
                "subspaces": ["r_pack", 0],
                "prompts": ["prompts", 0],
                **train_common,
                "vae": ["r_vae", 0],
                "safe_images": ["image", 0],
                "safe_captions": "a grey square",
            },
            lambda: preview(log=["F", 1]),
            texts("show_log"),
            label="TrainRiskRotations (safe images)",
            fuzz=("vae", "safe_images", "safe_captions"),
            extra={
                "safe_captions": [("two captions for one image", "one\ntwo")],
                "safe_images": [("RGBA image", ["rgba", 0]), ("image of another size", ["odd_image", 0])],
            },
        ),
        Spec(
            "SaveSafeRoPEPack",
            {"pack": ["pack", 0], "name": lambda: unique("fuzz_saved_pack"), "overwrite": False},
            lambda: {},
            check_saved("saferope", "load_pack"),
            strings={"name": "name"},
            around={"overwrite": {"name": "fuzz_overwritten_pack"}},
            also={"overwrite": [("F", "name")]},
            extra={
                "name": [
                    ("existing name", PACK_FILE.removesuffix(".safetensors")),
                    ("dot file", ".hidden"),
                    ("sub/folder", "sub/folder"),
                ]
            },
        ),
        Spec(
            "SaveStatistics",
            {"statistics": ["stats", 0], "name": lambda: unique("fuzz_saved_stats"), "overwrite": False},
            lambda: {},
            check_saved("saferope_statistics", "load_statistics"),
            strings={"name": "name"},
            around={"overwrite": {"name": "fuzz_overwritten_stats"}},
            also={"overwrite": [("F", "name")]},
            extra={"name": [("existing name", STATS_FILE.removesuffix(".safetensors")), ("dot file", ".hidden")]},
        ),
        Spec(
            "LoadStatistics",
            {"name": STATS_FILE},
            lambda: {
                "build": {
                    "class_type": "BuildSubspaces",
                    "inputs": {"statistics": ["F", 0], "rank": 2, "lrs_threshold": 0.7, "hds_threshold": -1.0},
                },
                **preview(summary=["build", 1]),
            },
            texts("show_summary"),
            extra={
                "name": [
                    ("'none'", "none"),
                    ("malformed statistics file", "broken_stats.safetensors"),
                    ("sibling folder", f"../saferope/{PACK_FILE}"),
                ]
            },
        ),
        Spec(
            "CollectUVRAnchors",
            {
                "model": ["model", 0],
                "clip": ["clip", 0],
                "prompts": ["prompts", 0],
                "detection_block": 0,
                "sigmas": "1.0",
                "width": 64,
                "height": 64,
                "anchors_per_head": 1,
                "seed": 0,
            },
            lambda: preview(report=["F", 1]),
            texts("show_report"),
            extra={
                "detection_block": [("last single block", 1), ("past the last", 2), ("max", 255)],
                "anchors_per_head": [("max", 64)],
                "sigmas": [("'1.0, nan'", "1.0, nan"), ("'0'", "0")],
                "height": [("not a multiple of 16", 72)],
            },
            also={"anchors_per_head": [("F", "prompts")]},
        ),
        Spec(
            "RestrictUnsafeFlow",
            {
                "model": ["model", 0],
                "anchors": ["anchors", 0],
                "strength": 1.0,
                "threshold": -0.9,
                "sigma_start": 0.5,
                "detection_block": -1,
            },
            sample_f,
            check_restrict,
            extra={
                "threshold": [("-1 (calibrated)", -1.0), ("-0.999", -0.999)],
                "strength": [("0", 0.0)],
                "detection_block": [("the anchors' block", 0), ("another block", 1), ("max", 255)],
                "model": [("another model", ["r_model", 0])],
            },
            also={"model": [("F", "anchors")]},
        ),
        Spec(
            "SaveUVRAnchors",
            {"anchors": ["anchors", 0], "name": lambda: unique("fuzz_saved_anchors"), "overwrite": False},
            lambda: {},
            check_saved("saferope_anchors", "load_anchors"),
            strings={"name": "name"},
            around={"overwrite": {"name": "fuzz_overwritten_anchors"}},
            also={"overwrite": [("F", "name")]},
            extra={"name": [("existing name", ANCHORS_FILE.removesuffix(".safetensors")), ("dot file", ".hidden")]},
        ),
        Spec(
            "LoadUVRAnchors",
            {"name": ANCHORS_FILE},
            lambda: {
                "restrict": {
                    "class_type": "RestrictUnsafeFlow",
                    "inputs": {
                        "model": ["model", 0],
                        "anchors": ["F", 0],
                        "strength": 1.0,
                        "threshold": -1.0,
                        "sigma_start": 0.5,
                        "detection_block": -1,
                    },
                },
                **sampled(["restrict", 0], unique("fuzz/latent")),
            },
            check_load_anchors,
            extra={
                "name": [
                    ("'none'", "none"),
                    ("anchors with a NaN threshold", "broken_anchors.safetensors"),
                    ("anchors of another model", "wide_anchors.safetensors"),
                    ("sibling folder", f"../saferope/{PACK_FILE}"),
                ]
            },
            also={"name": [("restrict", "anchors")]},
        ),
        Spec(
            "TrainPromptRedirector",
            {
                "model": ["model", 0],
                "clip": ["clip", 0],
                "prompts": ["prompts", 0],
                "steps": 4,
                "learning_rate": 0.001,
                "seed": 0,
                "width": 64,
                "height": 64,
                "run_name": lambda: unique("fuzz_redirector_run"),
                "checkpoint_every": 1,
                "resume": False,
                "gradient_checkpointing": True,
            },
            lambda: preview(log=["F", 1]),
            texts("show_log"),
            strings={"run_name": "name"},
            around={"resume": {"run_name": "fuzz_resumed_redirector"}},
            extra={"resume": [("true", True)], "height": [("not a multiple of 16", 72)]},
        ),
        Spec(
            "SavePromptRedirector",
            {"redirector": ["redirector", 0], "name": lambda: unique("fuzz_saved_redirector"), "overwrite": False},
            lambda: {},
            check_saved("saferope_redirectors", "load_redirector"),
            strings={"name": "name"},
            around={"overwrite": {"name": "fuzz_overwritten_redirector"}},
            also={"overwrite": [("F", "name")]},
            extra={"name": [("existing name", REDIRECTOR_FILE.removesuffix(".safetensors")), ("dot file", ".hidden")]},
        ),
        Spec(
            "LoadPromptRedirector",
            {"name": REDIRECTOR_FILE},
            lambda: {
                "redirect": {
                    "class_type": "RedirectUnsafePrompts",
                    "inputs": {
                        "model": ["model", 0],
                        "redirector": ["F", 0],
                        "strength": 1.0,
                        "threshold": -20.0,
                        "cooldown": 3,
                    },
                },
                **sampled(["redirect", 0], unique("fuzz/latent")),
            },
            check_load_anchors,
            extra={
                "name": [
                    ("'none'", "none"),
                    ("redirector of another family", "flux2_redirector.safetensors"),
                    ("sibling folder", f"../saferope/{PACK_FILE}"),
                ]
            },
            also={"name": [("redirect", "redirector")]},
        ),
        Spec(
            "RedirectUnsafePrompts",
            {
                "model": ["model", 0],
                "redirector": ["redirector", 0],
                "strength": 1.0,
                "threshold": -20.0,
                "cooldown": 3,
            },
            sample_f,
            check_redirect,
            extra={
                "strength": [("0", 0.0)],
                "threshold": [("max", 20.0)],
                "model": [("another model", ["r_model", 0])],
            },
            also={"model": [("F", "redirector")]},
        ),
        Spec(
            "MineWordings",
            {
                "model": ["model", 0],
                "clip": ["clip", 0],
                "prompts": ["prompts", 0],
                "search": 8,
                "checked": 1,
                "keep": 1,
                "per_word": 1,
                "width": 64,
                "height": 64,
                "seed": 0,
            },
            lambda: preview(report=["F", 1], prompts=["F", 0]),
            texts("show_report", "show_prompts"),
            extra={"prompts": [("prompts with no anchors", ["no_anchor_prompts", 0])]},
        ),
        Spec(
            "SaveSafetyPack",
            {
                "prompts": ["prompts", 0],
                "name": lambda: unique("fuzz_saved_safety_pack"),
                "overwrite": False,
                "pack": ["pack", 0],
                "anchors": ["anchors", 0],
                "redirector": ["redirector", 0],
            },
            lambda: {},
            check_saved("saferope", "load_safety_pack"),
            strings={"name": "name"},
            around={"overwrite": {"name": "fuzz_overwritten_safety_pack"}},
            also={"overwrite": [("F", "name")], "pack": [("F", "pack")]},
            extra={
                "name": [("existing name", SAFETY_FILE.removesuffix(".safetensors")), ("dot file", ".hidden")],
                "pack": [("a pack of another model", ["r_pack", 0])],
            },
        ),
        Spec(
            "SaveSafetyPack",
            {
                "prompts": ["prompts", 0],
                "name": lambda: unique("fuzz_checked_safety_pack"),
                "overwrite": False,
                "pack": ["pack", 0],
                "anchors": ["anchors", 0],
                "model": ["model", 0],
                "clip": ["clip", 0],
                "width": 64,
                "height": 64,
            },
            lambda: {},
            check_guard_checked,
            label="SaveSafetyPack (guard check)",
            fuzz=("model", "clip", "width", "height"),
            also={"model": [("F", "clip")], "clip": [("F", "model")]},
            extra={"model": [("a model of another family", ["r_model", 0])]},
        ),
        Spec(
            "LoadSafetyPack",
            {"name": SAFETY_FILE},
            lambda: {
                "apply": {
                    "class_type": "ApplySafetyPack",
                    "inputs": {
                        "model": ["model", 0],
                        "safety_pack": ["F", 0],
                        "strength": 1.0,
                        "redirect": True,
                        "rotate": True,
                        "restrict": True,
                    },
                },
                **sampled(["apply", 0], unique("fuzz/latent")),
                **preview(info=["F", 1]),
            },
            check_load_anchors,
            extra={
                "name": [
                    ("'none'", "none"),
                    ("a rotation pack, not a safety pack", PACK_FILE),
                    ("sibling folder", f"../saferope_anchors/{ANCHORS_FILE}"),
                ]
            },
            also={"name": [("apply", "safety_pack")]},
        ),
        Spec(
            "ApplySafetyPack",
            {
                "model": ["model", 0],
                "safety_pack": ["safety", 0],
                "strength": 1.0,
                "redirect": True,
                "rotate": True,
                "restrict": True,
            },
            sample_f,
            check_apply_safety_pack,
            extra={"strength": [("0", 0.0)], "model": [("another model", ["r_model", 0])]},
            also={"model": [("F", "safety_pack")]},
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: files in the server's folders, files outside them, the server


@dataclass
class Context:
    server: object
    info: dict
    outside: Path
    load_pack: Callable
    load_statistics: Callable
    load_anchors: Callable
    load_redirector: Callable
    load_safety_pack: Callable
    base_latent: torch.Tensor | None = None
    file_values: list = field(default_factory=list)  # (label, value): things outside ComfyUI's folders
    before: dict = field(default_factory=dict)  # outside_state() before the first fuzzed graph


def write_pack(core, path: Path, shape, seed: int = 0, rank: int = 3):
    """A seeded pack with random orthonormal bases and strong rotations on some heads of three blocks."""
    g = torch.Generator().manual_seed(seed)
    h, d = shape.heads, shape.head_dim

    def bases():
        return torch.linalg.qr(torch.randn(h, d, rank, generator=g))[0].contiguous()

    names = shape.block_names()
    blocks = {
        name: core.BlockRotation(
            bases(),
            bases(),
            torch.tensor([i % 2 == 0 for i in range(h)]),
            2 * torch.randn(h, rank, rank, generator=g),
            2 * torch.randn(h, rank, rank, generator=g),
        )
        for name in (names[0], names[1], names[-1])
    }
    return core.SafeRoPEPack(shape, ["fuzzed"], rank, blocks).save(path)


def write_anchors(core, path: Path, shape, threshold=ANCHORS_THRESHOLD):
    """Anchors that flag every patch at every threshold below 1: the safe mean lies far opposite the first anchor
    of each head, so every output, seen from it, points along that anchor (score ~1)."""
    g = torch.Generator().manual_seed(1)
    anchors = torch.nn.functional.normalize(torch.randn(shape.heads, 2, shape.head_dim, generator=g), dim=-1)
    safe_mean = -1e4 * anchors[:, 0]
    core.uvr.UVRAnchors(shape, "single.0", anchors, safe_mean, threshold, 0.85, ["fuzzed"]).save(path)


def write_redirector(pack, path: Path, family: str) -> None:
    """A seeded redirector for the tiny dev model's conditioning (or one claiming another family) whose detector
    says 30 for everything: every sample is flagged at every threshold the node takes (at most 20)."""
    core = pack.saferope_core.redirector
    config = pack.saferope_comfy.prompt_redirect.redirector_config(comfyui_env.tiny_flux("dev"))
    torch.manual_seed(0)
    redirector = core.PromptRedirector(core.RedirectorConfig(family, config.width, config.latent_channels, 32, 4))
    with torch.no_grad():
        redirector.classify[-1].weight.zero_()
        redirector.classify[-1].bias.fill_(30.0)
    redirector.save(path, "fuzzed", {})


def write_with_metadata(path: Path, metadata) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path), metadata={"saferope": json.dumps(metadata)})


def write_fixtures(pack, server, outside: Path) -> None:
    core = pack.saferope_core
    models = server.base / "models"
    folders = {
        name: models / name for name in ("saferope", "saferope_statistics", "saferope_anchors", "saferope_redirectors")
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    dev = pack.saferope_comfy.flux_adapter.model_shape(comfyui_env.tiny_flux("dev"))
    radiance = pack.saferope_comfy.flux_adapter.model_shape(comfyui_env.tiny_flux("chroma_radiance"))
    write_pack(core, folders["saferope"] / PACK_FILE, dev)
    write_pack(core, folders["saferope"] / RADIANCE_PACK_FILE, radiance, seed=1)
    hub_copy = folders["saferope"] / "hub" / HUB_REPO / HUB_FILE
    hub_copy.parent.mkdir(parents=True)
    shutil.copy(folders["saferope"] / PACK_FILE, hub_copy)
    (folders["saferope"] / "corrupt.safetensors").write_bytes(b"\x00\x01 not a safetensors file \xff" * 8)
    write_anchors(core, folders["saferope_anchors"] / ANCHORS_FILE, dev)
    write_redirector(pack, folders["saferope_redirectors"] / REDIRECTOR_FILE, "flux")
    redirector, _ = core.redirector.PromptRedirector.load(folders["saferope_redirectors"] / REDIRECTOR_FILE)
    core.safety_pack.SafetyPack(
        dev,
        "fuzzed",
        core.load_pack(folders["saferope"] / PACK_FILE),
        core.uvr.UVRAnchors.load(folders["saferope_anchors"] / ANCHORS_FILE),
        redirector,
    ).save(folders["saferope"] / SAFETY_FILE)
    write_redirector(pack, folders["saferope_redirectors"] / "flux2_redirector.safetensors", "flux2")
    write_anchors(
        core,
        folders["saferope_anchors"] / "wide_anchors.safetensors",
        core.ModelShape(dev.family, dev.double_blocks, dev.single_blocks, 2 * dev.heads, dev.head_dim),
    )
    write_with_metadata(
        folders["saferope_anchors"] / "broken_anchors.safetensors",
        {
            "kind": core.uvr.ANCHORS_KIND,
            "format_version": 1,
            "model": dev.to_dict(),
            "block": "single.0",
            "threshold": NAN,
            "sigma_start": 0.85,
            "concepts": [],
        },
    )
    write_with_metadata(
        folders["saferope_statistics"] / "broken_stats.safetensors",
        {
            "kind": core.statistics.STATISTICS_KIND,
            "format_version": 1,
            "model": "flux",
            "reservoir_size": -1,
            "seed": "0",
            "count": [],
        },
    )

    inputs = server.base / "input"
    (inputs / PROMPT_FILE).write_text("a quiet lake at dawn\nan old red barn\n", encoding="utf-8")
    (inputs / "huge_field.csv").write_text('prompt\n"' + "x" * 200_000 + '"\nsecond\n', encoding="utf-8")
    (inputs / "binary.txt").write_bytes(bytes(range(256)) * 4 + b"\xff\xfe\x00 end\n")
    refs = inputs / "fuzz_refs"
    refs.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 60, 30)).save(refs / "ref.png")
    (outside / "secret.txt").write_text(f"{SECRET}\n{SECRET} again\n", encoding="utf-8")
    (outside / "refs").mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(outside / "refs" / "ref.png")
    (outside / "lists.json").write_text(
        json.dumps({"subjects": [SECRET], "modifiers": [], "templates": ["{subject}"], "safe": [SECRET]}),
        encoding="utf-8",
    )
    (inputs / "link_out.txt").symlink_to(outside / "secret.txt")
    (inputs / "link_out_dir").symlink_to(outside / "refs", target_is_directory=True)


def outside_values(server, outside: Path) -> list[tuple[str, object]]:
    """Names of things outside ComfyUI's folders, as a node could be given them."""
    inputs = server.base / "input"
    return [
        ("absolute path of an outside file", str(outside / "secret.txt")),
        ("traversal to an outside file", os.path.relpath(outside / "secret.txt", inputs)),
        ("symlink to an outside file", "link_out.txt"),
        ("absolute path of an outside folder", str(outside / "refs")),
        ("traversal to an outside folder", os.path.relpath(outside / "refs", inputs)),
        ("symlink to an outside folder", "link_out_dir"),
        ("deep traversal to /dev/zero", "../" * 12 + "dev/zero"),
        ("/proc/self/environ", "/proc/self/environ"),
    ]


def run_graph(server, graph: dict, timeout: float = 180.0):
    """('refused', body) for an HTTP 400, else ('ran', history entry)."""
    POSTED["graphs"] += 1
    try:
        prompt_id = server.post_prompt(graph)
    except RuntimeError as err:
        text = str(err)
        if not text.startswith("ComfyUI refused the prompt"):
            raise
        return "refused", text
    return "ran", server.wait(prompt_id, timeout=timeout)


def tree(root: Path, skip=("__pycache__", ".git", ".pytest_cache", ".ruff_cache")) -> set[str]:
    """Every path under root (files, links, folders), without caches; links are not followed."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        rel = os.path.relpath(folder, root)
        found.update(os.path.normpath(os.path.join(rel, name)) for name in dirs + files)
    return found


def probe_paths(ctx) -> list[Path]:
    """Where a path payload could land if a node used it as given, from any folder a node reads or writes."""
    base = ctx.server.base
    roots = [base / "models" / f for f in ("saferope", "saferope_statistics", "saferope_training", "saferope_anchors")]
    roots += [
        base / "input",
        base / "output",
        base / "models",
        base,
        ctx.server.comfyui,
        comfyui_env.REPO,
        Path.cwd(),
        Path(tempfile.gettempdir()),
    ]
    payloads = {v for _, v in _unicode_and_paths() if isinstance(v, str) and "\x00" not in v}
    payloads |= {v.replace("\\", "/") for v in payloads}
    paths = set()
    for root in roots:
        for payload in payloads:
            for suffix in ("", ".safetensors"):
                paths.add(Path(os.path.normpath(os.path.join(root, payload + suffix))))
    return sorted(p for p in paths if not p.is_relative_to(base))


def outside_state(ctx) -> dict:
    temp = tempfile.gettempdir()
    return {
        "repository": tree(comfyui_env.REPO),
        "ComfyUI": tree(ctx.server.comfyui),
        "outside folder": tree(ctx.outside),
        "probed": {str(p) for p in probe_paths(ctx) if os.path.lexists(p)},
        "temp folder": {n for n in os.listdir(temp) if ".safetensors" in n},
    }


@pytest.fixture(scope="module")
def ctx(pack):
    from comfy_server import ComfyServer

    nodes = {"ComfyUI-SafeRoPE": comfyui_env.REPO, "tiny_flux_nodes": comfyui_env.REPO / "tests" / "tiny_flux_nodes"}
    outside = Path(tempfile.mkdtemp(prefix="saferope-fuzz-outside-"))
    started = time.monotonic()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")  # a Hub miss fails at once instead of waiting on the network
            with ComfyServer(nodes) as server:
                c = Context(
                    server,
                    server.object_info(),
                    outside,
                    pack.saferope_core.load_pack,
                    pack.saferope_core.QKStatistics.load,
                    pack.saferope_core.uvr.UVRAnchors.load,
                    pack.saferope_core.redirector.PromptRedirector.load,
                    pack.saferope_core.safety_pack.load_safety_pack,
                )
                write_fixtures(pack, server, outside)
                c.file_values = outside_values(server, outside)
                c.before = outside_state(c)
                c.info = server.object_info()  # the file lists now hold the fixtures
                setup = {
                    **upstream(),
                    "collect": {
                        "class_type": "CollectQK",
                        "inputs": {
                            "model": ["model", 0],
                            "clip": ["clip", 0],
                            "prompts": ["prompts", 0],
                            "sigmas": "1.0, 0.7",
                            "width": 64,
                            "height": 64,
                            "seed": 0,
                            "reservoir_size": 64,
                        },
                    },
                    "F": {
                        "class_type": "SaveStatistics",
                        "inputs": {"statistics": ["collect", 0], "name": STATS_FILE, "overwrite": False},
                    },
                    **sampled(["model", 0], "fuzz/unpatched"),
                }
                kind, entry = run_graph(server, setup)
                assert kind == "ran" and entry["status"]["status_str"] == "success", (kind, entry)
                c.base_latent = saved_latent(c, entry)
                assert c.base_latent is not None and torch.isfinite(c.base_latent).all()
                yield c
    finally:
        shutil.rmtree(outside, ignore_errors=True)
        for name, counts in OUTCOMES.items():
            print(
                f"\n[fuzz] {name}: {sum(counts.values())} fuzzed graphs: {counts['refused']} refused by ComfyUI, "
                f"{counts['failed']} failed on a node, {counts['ran']} ran",
                end="",
            )
        print(f"\n[fuzz] {POSTED['graphs']} graphs posted in {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------------------------------------------------------
# Judging one graph


def input_spec(info: dict, node: str, name: str):
    inputs = info[node]["input"]
    return inputs.get("required", {}).get(name) or inputs.get("optional", {}).get(name)


def kind_of(spec_entry) -> str:
    io_type = spec_entry[0]
    if isinstance(io_type, list) or io_type == "COMBO":
        return "COMBO"
    return io_type if io_type in ("INT", "FLOAT", "STRING", "BOOLEAN") else "SOCKET"


def unlisted_inputs(ctx, spec: Spec) -> list[str]:
    """Optional widget inputs the server serves that no spec of the node lists (e.g. an input added later): the
    node's first spec fuzzes them too, leaving them at their default otherwise."""
    if spec is not next(s for s in SPECS if s.node == spec.node):
        return []
    listed = {name for s in SPECS if s.node == spec.node for name in s.valid}
    optional = ctx.info[spec.node]["input"].get("optional", {})
    return [name for name, entry in optional.items() if name not in listed and kind_of(entry) != "SOCKET"]


def valid_value(ctx, spec: Spec, name: str):
    """The input's value in the valid graph; for an unlisted input, its default (or its first choice)."""
    values = spec.inputs(name)
    if name in values:
        return values[name]
    entry = input_spec(ctx.info, spec.node, name)
    options = entry[1] if len(entry) > 1 else {}
    if "default" in options:
        return options["default"]
    return comfyui_env.combo_options(entry)[0] if kind_of(entry) == "COMBO" else None


def cases(ctx, spec: Spec, name: str) -> list[tuple[str, object]]:
    entry = input_spec(ctx.info, spec.node, name)
    kind, options = kind_of(entry), entry[1] if len(entry) > 1 else {}
    valid = valid_value(ctx, spec, name)
    if kind in ("INT", "FLOAT"):
        values = number_values(kind, valid, options.get("min"), options.get("max"))
    elif kind == "STRING":
        values = string_values()
        if spec.strings.get(name) in ("file", "folder"):
            values += ctx.file_values
    elif kind == "BOOLEAN":
        values = bool_values()
    elif kind == "COMBO":
        values = combo_values(str(valid))
    else:
        values = socket_values(valid)
    return values + [(label, value(ctx) if callable(value) else value) for label, value in spec.extra.get(name, [])]


def as_received(info: dict, node: str, inputs: dict) -> dict:
    """The node's widget inputs converted as ComfyUI's validation converts them (for a graph that ran)."""
    out = {}
    for name, value in inputs.items():
        entry = input_spec(info, node, name)
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
        kind = kind_of(entry) if entry else "SOCKET"
        convert = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(kind)
        try:
            out[name] = convert(value) if convert and not isinstance(value, list) else value
        except (TypeError, ValueError, OverflowError):
            out[name] = value
    return out


def pack_validation_exceptions(data: dict) -> list[str]:
    """Exceptions in a refusal that the pack's own validation raised: the traceback passes through the pack's code,
    or the call of a pack node's validate_inputs failed (e.g. a required argument was left out)."""
    found = []
    for node in data.get("node_errors", {}).values():
        for error in node.get("errors", []):
            extra, details = error.get("extra_info") or {}, str(error.get("details", ""))
            if "exception_type" not in extra:
                continue
            in_pack = any("ComfyUI-SafeRoPE" in line for line in extra.get("traceback", []))
            if in_pack or any(f"{n}.validate_inputs(" in details for n in SPEC_NODES):
                found.append(f"{extra['exception_type']}: {details[:300]}")
    return found


def judge(ctx, spec: Spec, name: str, graph: dict, outside: bool = False) -> list[str]:
    """Problems of one fuzzed graph (empty when it was refused, failed properly or ran sanely). `outside`: the value
    names something outside ComfyUI's input folder, which must be refused as such."""
    kind, result = run_graph(ctx.server, graph)
    status = {} if kind == "refused" else result["status"]
    outcome = kind if kind == "refused" else "ran" if status.get("status_str") == "success" else "failed"
    OUTCOMES.setdefault(spec.name, Counter())[outcome] += 1
    if kind == "refused":
        body = result.split(": ", 1)[-1]
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return [f"refused without a JSON answer: {result[:300]}"]
        if "(400)" not in result.split(":", 1)[0]:
            return [f"the server answered {result[:300]}"]
        problems = [
            f"ComfyUI refused it, but the pack's validation raised {t}" for t in pack_validation_exceptions(data)
        ]
        for node in data.get("node_errors", {}).values():
            display = ctx.info.get(node.get("class_type"), {}).get("display_name", "")
            for error in node.get("errors", []):
                if (
                    error.get("type") == "custom_validation_failed"
                    and node.get("class_type") in SPEC_NODES
                    and f"{display}, input '" not in error.get("details", "")
                ):
                    problems.append(f"the pack's validation message does not name node and input: {error}")
        return problems
    if status.get("status_str") == "success":
        if outside:
            return ["it ran with a path outside ComfyUI's input folder"]
        received = as_received(ctx.info, spec.node, graph["F"]["inputs"])
        return spec.check(ctx, result, received)
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    if len(errors) != 1:
        return [f"status {status.get('status_str')!r} with {len(errors)} execution errors: {status}"[:600]]
    error = errors[0]
    node_id, message = error.get("node_id"), error.get("exception_message", "")
    exc_type = error.get("exception_type", "")
    class_type = graph.get(node_id, {}).get("class_type")
    display = ctx.info.get(class_type, {}).get("display_name", class_type)
    allowed = [("F", name), *spec.also.get(name, [])]
    where = f"{node_id} ({class_type}) raised {exc_type.rsplit('.', 1)[-1]}: {message.strip()[:400]!r}"
    if not exc_type.endswith("SafeRoPEInputError"):
        return [f"a raw Python exception: {where}"]
    if not any(node_id == n and message.startswith(f"{display}, input '{i}'") for n, i in allowed):
        return [f"the pack's error names another node or input than {allowed}: {where}"]
    if SECRET in message:
        return [f"the error shows the content of a file outside ComfyUI's folders: {where}"]
    if outside and "input folder" not in message:
        return [f"a path outside ComfyUI's input folder was not refused as such: {where}"]
    return []


def fuzz_node(ctx, spec: Spec) -> list[str]:
    """Run the valid graph, then every bad value of every fuzzed input; returns the problems, each with its graph."""
    problems = []
    graph = spec.graph()
    kind, entry = run_graph(ctx.server, graph)
    assert kind == "ran" and entry["status"]["status_str"] == "success", f"the valid graph of {spec.name}: {entry}"
    valid_problems = spec.check(ctx, entry, as_received(ctx.info, spec.node, graph["F"]["inputs"]))
    assert not valid_problems, f"the valid graph of {spec.name}: {valid_problems}"
    outside = {label for label, _ in ctx.file_values}
    for name in [*(spec.fuzz or spec.valid), *unlisted_inputs(ctx, spec)]:
        for label, value in cases(ctx, spec, name):
            graph = spec.graph(name, value)
            for problem in judge(ctx, spec, name, graph, outside=label in outside):
                if not problems:  # the first one with its whole graph; the others differ from it only in node F
                    used = {k: v for k, v in graph.items() if k in reachable(graph)}
                    problem += f"\n    whole graph: {json.dumps(used, ensure_ascii=True)}"
                shown = json.dumps(graph["F"]["inputs"], allow_nan=True, ensure_ascii=True)
                problems.append(f"{spec.name}.{name} = {label}: {problem}\n    node F: {shown}")
    return problems


def reachable(graph: dict) -> set[str]:
    """The nodes ComfyUI validates and runs: output nodes (PreviewAny, SaveLatent, the pack's output nodes) and
    everything they link to."""
    outputs = [k for k, v in graph.items() if v["class_type"] in ("PreviewAny", "SaveLatent") or k == "F"]
    seen, todo = set(), list(outputs)
    while todo:
        node = todo.pop()
        if node in seen or node not in graph:
            continue
        seen.add(node)
        todo += [v[0] for v in graph[node]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


# ---------------------------------------------------------------------------------------------------------------
# Tests

SPECS = specs()
SPEC_NODES = {s.node for s in SPECS}


def test_every_node_and_input_is_fuzzed(pack, ctx):
    """The specs cover every node the server serves from this pack (the pack's NODES) and every input each node
    serves in /object_info."""
    served_nodes = {name for name, node in ctx.info.items() if "ComfyUI-SafeRoPE" in node.get("python_module", "")}
    assert served_nodes == {n.__name__ for n in pack.nodes.NODES}  # the pack names each node id after its class
    assert {s.node for s in SPECS} == served_nodes
    for node in served_nodes:
        served = {name for part in ("required", "optional") for name in ctx.info[node]["input"].get(part, {})}
        fuzzed = {name for s in SPECS if s.node == node for name in [*(s.fuzz or s.valid), *unlisted_inputs(ctx, s)]}
        assert served == fuzzed, (
            f"{node}: inputs served {sorted(served)}, fuzzed {sorted(fuzzed)} (a new "
            "required or socket input needs a valid value in its node's spec)"
        )


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_fuzz_node(ctx, spec):
    """Every bad value of every input of the node is refused, fails with the pack's error on that input, or runs
    to a sane output; and nothing outside the server's base folder appears."""
    before = outside_state(ctx)
    problems = fuzz_node(ctx, spec)
    after = outside_state(ctx)
    for what in before:
        new = sorted(after[what] - before[what])
        if new:
            problems.append(f"{spec.name}: created outside the server's base folder ({what}): {new[:10]}")
    assert not problems, f"{len(problems)} fuzzed graphs of {spec.name} were not handled:\n" + "\n".join(problems)


def test_nothing_outside_the_base_folder_changed(ctx):
    """Over the whole module: the repository, the ComfyUI tree, the outside folder and every probed path are as
    before the first fuzzed graph (only the server's base folder may change)."""
    after = outside_state(ctx)
    for what, paths in ctx.before.items():
        new, gone = sorted(after[what] - paths), sorted(paths - after[what])
        assert not new and not gone, f"{what}: new {new[:10]}, gone {gone[:10]}"
    print(f"\n[fuzz] {POSTED['graphs']} graphs posted so far")
