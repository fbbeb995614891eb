"""What the node files share: the pack's io types, inputs several nodes take, model and pack checks, parsed
inputs, file names, UI text."""

from __future__ import annotations

import functools
import inspect
import math
import os

import torch
from comfy_api.v0_0_2 import io

from ..saferope_comfy.flux_adapter import NotFluxError, model_shape
from ..saferope_core import PromptAlignmentError, PromptSet, QKStatistics, SafeRoPEPack, SafeRoPEPackError
from ..saferope_core.redirector import PromptRedirector
from ..saferope_core.safety_pack import SafetyPack
from ..saferope_core.uvr import UVRAnchors
from .errors import SafeRoPEInputError

# The pack's own socket types (the names stay: saved workflows connect by them)
Pack = io.Custom("SAFEROPE_PACK")  # a pack, or the untrained subspaces Build Subspaces makes
Statistics = io.Custom("SAFEROPE_STATS")  # q/k statistics collected by Collect Q/K
Prompts = io.Custom("SAFEROPE_PROMPTS")  # a prompt set: unsafe prompts with subjects, safe prompts
Anchors = io.Custom("UVR_ANCHORS")  # UVR anchors collected by Collect UVR Anchors
Redirector = io.Custom("SAFEROPE_REDIRECTOR")  # a prompt redirector (detector + token-wise redirection)
SafetyPackType = io.Custom("SAFEROPE_SAFETY_PACK")  # every guard of one concept in one file

MAX_SEED = 2**31 - 1
MAX_NAME = 120  # characters of a file name the nodes write


def seed_input(tooltip: str) -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=MAX_SEED, tooltip=tooltip)


def size_inputs(what: str, optional: bool = False) -> list[io.Int.Input]:
    """width and height of the images `what` runs at."""
    return [
        io.Int.Input(
            name,
            default=512,
            min=64,
            max=2048,
            step=16,
            optional=optional,
            tooltip=f"image {name} in pixels {what} (sets the latent size; 512 is a good start)",
        )
        for name in ("width", "height")
    ]


def sigmas_input(default: str, tooltip: str) -> io.String.Input:
    return io.String.Input("sigmas", default=default, tooltip=tooltip)


def _is_clip(value) -> bool:
    return hasattr(value, "tokenize") and hasattr(value, "encode_from_tokens_scheduled")


def _is_latent(value) -> bool:
    return isinstance(value, dict) and torch.is_tensor(value.get("samples"))


# io type -> (check, what the input takes): values arrive through links, or as anything through the API. MODEL is
# checked by require_flux, which also names what was found instead of a FLUX-family model.
SOCKETS = {
    "CLIP": (_is_clip, "a text encoder (from a CLIP loader)"),
    "VAE": (lambda v: hasattr(v, "encode") and hasattr(v, "decode"), "a VAE (from Load VAE)"),
    "IMAGE": (lambda v: torch.is_tensor(v) and v.ndim == 4 and v.shape[-1] in (1, 3, 4), "images"),
    "LATENT": (_is_latent, "a latent"),
    "SAFEROPE_PACK": (lambda v: isinstance(v, SafeRoPEPack), "a pack (Load SafeRoPE Pack, Build Subspaces or Train)"),
    "SAFEROPE_STATS": (lambda v: isinstance(v, QKStatistics), "statistics (Collect Q/K or Load Statistics)"),
    "SAFEROPE_PROMPTS": (lambda v: isinstance(v, PromptSet), "a prompt set (SafeRoPE Prompt Set)"),
    "UVR_ANCHORS": (lambda v: isinstance(v, UVRAnchors), "UVR anchors (Collect or Load UVR Anchors)"),
    "SAFEROPE_SAFETY_PACK": (lambda v: isinstance(v, SafetyPack), "a safety pack (Load Safety Pack)"),
    "SAFEROPE_REDIRECTOR": (
        lambda v: isinstance(v, PromptRedirector),
        "a prompt redirector (Train or Load Prompt Redirector)",
    ),
}


def check_input(node_class, spec, value) -> None:
    """One input's value against its schema: a finite number in range, one of the choices, text, a boolean, or the
    kind of object the socket takes; else an error naming the node, the input and what it takes. ComfyUI's own
    checks let NaN through, do not see values that arrive through links, and (0.3.64) skip V3 choices."""
    kind, name = spec.get_io_type(), spec.id

    def refuse(problem: str, fix: str):
        raise SafeRoPEInputError(node_class.NODE, name, problem, fix)

    if kind in ("INT", "FLOAT"):
        low, high = spec.min, spec.max
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (
            not number
            or not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            refuse(f"{value!r} is not a number from {low} to {high}", f"Set {name} to a value in that range")
    elif kind == "COMBO":
        if not isinstance(value, str) or value not in spec.options:
            refuse(f"{str(value)[:80]!r} is not one of its choices", "Pick one from the list")
    elif kind == "STRING":
        if not isinstance(value, str):
            refuse(f"{type(value).__name__} given, text expected", "Type text")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            refuse(f"{value!r} is not true or false", "Switch it on or off")
    elif kind in SOCKETS:
        check, what = SOCKETS[kind]
        if not check(value):
            refuse(f"{type(value).__name__} given, {what} expected", f"Connect {what}")


def checked(execute):
    """Decorator of a node's execute: every input that is given is checked against the node's schema first, and a
    text encoder that does not fit the model (PromptAlignmentError, found while encoding) is named as the node's
    'clip' input."""
    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        given = signature.bind(cls, *args, **kwargs).arguments
        for spec in cls.define_schema().inputs:
            if spec.id in given and not (spec.optional and given[spec.id] is None):
                check_input(cls, spec, given[spec.id])
        try:
            return execute(cls, *args, **kwargs)
        except PromptAlignmentError as err:
            fix = "Connect the text encoder that comes with this model (its checkpoint's CLIP)"
            raise SafeRoPEInputError(cls.NODE, "clip" if "clip" in given else "model", str(err), fix) from None

    return run


def require_flux(node: str, model):
    """The model's shape, or an error on `node`'s 'model' input naming what was found instead of FLUX."""
    try:
        return model_shape(model)
    except NotFluxError as err:
        raise SafeRoPEInputError(node, "model", str(err)) from None


def require_pack_fits(node: str, input_name: str, pack, model, fix: str):
    """The model's shape, after checking that `pack` (or subspaces) was built for it; else an error naming both."""
    shape = require_flux(node, model)
    try:
        pack.check_model(shape)
    except SafeRoPEPackError as err:
        raise SafeRoPEInputError(node, input_name, str(err), fix) from None
    return shape


def parse_sigmas(text: str, node: str) -> list[float]:
    try:
        sigmas = [float(s) for s in text.replace(";", ",").split(",") if s.strip()]
    except ValueError:
        sigmas = []
    if not sigmas or not all(0 < s <= 1 for s in sigmas):
        raise SafeRoPEInputError(
            node,
            "sigmas",
            f"'{text}' is not a list of numbers in (0, 1]",
            "Write e.g. '1.0, 0.8, 0.6' (1.0 = pure noise)",
        )
    return sigmas


def file_stem(node: str, name: str, input_name: str = "name") -> str:
    """The file name `name` stands for, without folders or extension; an error when it is not usable."""
    stem = os.path.basename(name.strip().replace("\\", "/")).removesuffix(".safetensors")
    usable = stem and not stem.startswith(".") and len(stem) <= MAX_NAME and all(c.isprintable() for c in stem)
    if not usable:
        raise SafeRoPEInputError(
            node,
            input_name,
            f"{name[:80]!r} is not a usable file name",
            f"Type a name like 'nudity' (letters, digits, spaces; at most {MAX_NAME} characters)",
        )
    return stem


def target_path(node: str, folder: str, name: str, overwrite: bool) -> str:
    """A safe path for `name` inside `folder`; refuses to replace an existing file unless asked."""
    path = os.path.join(folder, f"{file_stem(node, name)}.safetensors")
    if os.path.exists(path) and not overwrite:
        raise SafeRoPEInputError(node, "name", f"{path} already exists", "Pick another name or enable overwrite")
    return path


def validation(node: str, input_name: str, value, check) -> bool | str:
    """For a node's validate_inputs: True when the text `value` passes `check`, else the error naming the node and
    the input (ComfyUI shows it before anything runs). A value that comes through a link, or none, is None here and
    is checked when the node runs instead."""
    if value is None:
        return True
    try:
        if not isinstance(value, str):
            raise SafeRoPEInputError(node, input_name, f"{type(value).__name__} given, text expected", "Type text")
        check(value)
    except SafeRoPEInputError as err:
        return str(err)
    return True


def input_path(node: str, input_name: str, name: str, folder: bool = False) -> str:
    """The file (or folder) `name` inside ComfyUI's input folder, where users put files for nodes: a relative name
    that stays inside it (links followed). Nodes read no other file the user names."""
    import folder_paths

    root = os.path.realpath(folder_paths.get_input_directory())
    where = "ComfyUI's input folder"
    if not name or "\0" in name or len(name) > 255 or os.path.isabs(name) or "\\" in name and os.sep == "/":
        raise SafeRoPEInputError(
            node,
            input_name,
            f"'{name[:80]}' is not a name inside {where}",
            "Put the file in ComfyUI/input and give its name, e.g. captions.txt",
        )
    path = os.path.realpath(os.path.join(root, name))
    if not path.startswith(root + os.sep):
        raise SafeRoPEInputError(
            node,
            input_name,
            f"'{name[:80]}' is outside {where}",
            "Put the file in ComfyUI/input and give its name, e.g. captions.txt",
        )
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise SafeRoPEInputError(
            node,
            input_name,
            f"there is no {'folder' if folder else 'file'} '{name[:80]}' in {where}",
            "Check the name (it is relative to ComfyUI/input)",
        )
    return path


def save_node_output(path: str, report: str = "") -> io.NodeOutput:
    """A Save node's output: the path, also shown under the node (after `report`, when there is one)."""
    return io.NodeOutput(path, ui={"text": [f"{report}\nsaved {path}" if report else f"saved {path}"]})


def name_inputs(default: str, what: str) -> list[io.Input]:
    """name + overwrite of a Save node."""
    return [
        io.String.Input("name", default=default, tooltip=f"File name of the {what} (without .safetensors)"),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of that name if there is one"),
    ]


def show_progress_text(node_id, text: str) -> None:
    """Text under the node in the UI, when the server supports it (ComfyUI >= 0.3.4x)."""
    try:
        from server import PromptServer

        server = getattr(PromptServer, "instance", None)
        if node_id is not None and server is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)
    except Exception:  # the UI text is a convenience; training goes on without it
        pass
