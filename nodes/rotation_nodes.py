"""Load SafeRoPE Pack and Apply Risk Rotation."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..saferope_comfy import model_files
from ..saferope_core import SafeRoPEPackError, load_pack
from .common import Pack, checked
from .errors import SafeRoPEInputError
from .guards import rotated

TOKEN_CHOICES = {"both": ("txt", "img"), "text": ("txt",), "image": ("img",)}


class LoadSafeRoPEPack(io.ComfyNode):
    NODE = "Load SafeRoPE Pack"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadSafeRoPEPack",
            display_name=cls.NODE,
            category="SafeRoPE",
            description="Loads a SafeRoPE pack (.safetensors) from models/saferope. To fetch a published pack, set "
            "hf_repo_id and hf_filename: it is downloaded into models/saferope once, only if it is not "
            "there yet. A damaged, foreign or pickled file is refused with the reason.",
            inputs=[
                io.Combo.Input(
                    "pack_name",
                    options=[model_files.NO_FILE, *model_files.pack_files()],
                    tooltip="A pack file in ComfyUI/models/saferope (build one with the Collect & Train "
                    "nodes, or download one)",
                ),
                io.String.Input(
                    "hf_repo_id",
                    default="",
                    optional=True,
                    tooltip="To download a pack: the Hugging Face repo id, e.g. user/saferope-packs",
                ),
                io.String.Input(
                    "hf_filename",
                    default="",
                    optional=True,
                    tooltip="To download a pack: the .safetensors file inside that repo",
                ),
            ],
            outputs=[
                Pack.Output("pack", display_name="pack", tooltip="The pack, for Apply Risk Rotation or LRS Visualize"),
                io.String.Output(
                    "info",
                    display_name="info",
                    tooltip="Concept, rank, heads rotated and the model the pack was built for",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, pack_name, hf_repo_id="", hf_filename=""):
        """Reload when the file changes, not only when the name does."""
        try:
            return model_files.fingerprint(cls.path(pack_name, hf_repo_id, hf_filename, download=False))
        except (SafeRoPEInputError, FileNotFoundError):  # execute says why
            return ""

    @classmethod
    def path(cls, pack_name, hf_repo_id, hf_filename, download=True) -> str:
        node = cls.NODE
        repo, filename = hf_repo_id.strip(), hf_filename.strip()
        if repo or filename:
            if not (repo and filename):
                raise SafeRoPEInputError(
                    node,
                    "hf_filename" if repo else "hf_repo_id",
                    "a Hub download needs both a repo id and a file name",
                    "Fill in both, or clear both to use pack_name",
                )
            try:
                return (
                    model_files.download_from_hub(repo, filename) if download else model_files.hub_path(repo, filename)
                )
            except model_files.HubDownloadError as err:
                raise SafeRoPEInputError(
                    node,
                    err.input_name,
                    str(err),
                    "Check the repo id and file name (packs are .safetensors), or load a pack from models/saferope",
                ) from None
        if pack_name == model_files.NO_FILE:
            raise SafeRoPEInputError(
                node,
                "pack_name",
                "no pack chosen",
                "Put a pack in models/saferope (or build one with the Collect & Train nodes), "
                "or set hf_repo_id and hf_filename",
            )
        return model_files.resolve(pack_name)

    @classmethod
    @checked
    def execute(cls, pack_name, hf_repo_id="", hf_filename="") -> io.NodeOutput:
        path = cls.path(pack_name, hf_repo_id, hf_filename)
        try:
            pack = load_pack(path)
        except SafeRoPEPackError as err:
            raise SafeRoPEInputError(cls.NODE, "pack_name", str(err), "Rebuild or re-download the pack") from None
        info = pack.describe()
        return io.NodeOutput(pack, info, ui={"text": [info]})


class ApplyRiskRotation(io.ComfyNode):
    NODE = "Apply Risk Rotation"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyRiskRotation",
            display_name=cls.NODE,
            category="SafeRoPE",
            description="Patches the model's attention so that tokens of the pack's concept are rotated inside its "
            "unsafe subspaces and the concept cannot form; everything else is left alone. The input model "
            "is not changed. Chain several Apply nodes to stack packs.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="A FLUX-family model (FLUX.1, FLUX.2, Chroma, ...) the pack was built for"
                ),
                Pack.Input("pack", tooltip="From Load SafeRoPE Pack (or Train Risk Rotations)"),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="Scales every rotation: 1 as trained, 0 turns the pack off",
                ),
                io.Combo.Input(
                    "apply_to",
                    options=list(TOKEN_CHOICES),
                    default="both",
                    tooltip="Rotate the prompt's tokens, the image's tokens, or both (as trained)",
                ),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the model; sample with it instead of the input")],
        )

    @classmethod
    @checked
    def execute(cls, model, pack, strength, apply_to) -> io.NodeOutput:
        return io.NodeOutput(rotated(cls.NODE, "pack", model, pack, float(strength), TOKEN_CHOICES[apply_to]))
