"""The one shape of the Save and Load nodes of the pack's files: a node class states what it writes or reads (its
socket, folder, file kind and how the object is written or read); the schema, the name checks, the file list, the
reload fingerprint and the errors that name the node and its input are defined here once."""

from __future__ import annotations

from typing import Any, ClassVar

from comfy_api.v0_0_2 import io

from ..saferope_comfy import model_files
from ..saferope_core.errors import SafeRoPEError
from .common import checked, file_stem, name_inputs, save_node_output, target_path, validation
from .errors import SafeRoPEInputError


class SaveFileNode(io.ComfyNode):
    """Writes its input to models/<FOLDER>/<name>.safetensors (never over a file unless `overwrite`). A subclass's
    execute takes its input under the schema's name and calls `save`."""

    NODE: ClassVar[str]  # display name, as errors name the node
    NODE_ID: ClassVar[str]
    CATEGORY: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    CONTENT: ClassVar[io.Input]  # the socket of what is written; its id names the input
    DEFAULT_NAME: ClassVar[str]
    WHAT: ClassVar[str]  # what the file holds, in the name's tooltip
    FOLDER: ClassVar[str] = model_files.FOLDER

    @classmethod
    def write(cls, content, path: str) -> None:
        content.save(path)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.NODE,
            category=cls.CATEGORY,
            description=cls.DESCRIPTION,
            inputs=[cls.CONTENT, *name_inputs(cls.DEFAULT_NAME, cls.WHAT)],
            outputs=[io.String.Output("path", display_name="path", tooltip=f"Where the {cls.WHAT} file was written")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name=None):  # no **kwargs: with them ComfyUI skips its own checks of widget values
        return validation(cls.NODE, "name", name, lambda text: file_stem(cls.NODE, text))

    @classmethod
    def save(cls, content, name: str, overwrite: bool) -> io.NodeOutput:
        """What each Save node's execute does with its input (execute names the input as the schema does)."""
        path = target_path(cls.NODE, model_files.output_dir(cls.FOLDER), name, overwrite)
        cls.write(content, path)
        return save_node_output(path)


class LoadFileNode(io.ComfyNode):
    """Reads a file of KIND chosen from FOLDERS (the first folder that has the name); a file that changed on disk is
    read again."""

    NODE: ClassVar[str]
    NODE_ID: ClassVar[str]
    CATEGORY: ClassVar[str] = "SafeRoPE"
    DESCRIPTION: ClassVar[str]
    KIND: ClassVar[str]
    FOLDERS: ClassVar[tuple[str, ...]]
    NAME_TOOLTIP: ClassVar[str]
    OUTPUTS: ClassVar[list[io.Output]]
    NONE_CHOSEN: ClassVar[tuple[str, str]]  # the problem and the fix when no file is chosen
    ERROR: ClassVar[type[SafeRoPEError]]  # what `read` raises for a file it refuses
    REMAKE: ClassVar[str]  # the fix for a refused file

    @classmethod
    def read(cls, path: str) -> Any:
        raise NotImplementedError

    @classmethod
    def output(cls, content) -> io.NodeOutput:
        return io.NodeOutput(content)

    @classmethod
    def define_schema(cls):
        files = model_files.files_of_kind(cls.KIND, *cls.FOLDERS)
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.NODE,
            category=cls.CATEGORY,
            description=cls.DESCRIPTION,
            inputs=[io.Combo.Input("name", options=[model_files.NO_FILE, *files], tooltip=cls.NAME_TOOLTIP)],
            outputs=cls.OUTPUTS,
        )

    @classmethod
    def fingerprint_inputs(cls, name):
        """Reload when the file changes, not only when the name does."""
        return model_files.fingerprint_in(name, *cls.FOLDERS)

    @classmethod
    @checked
    def execute(cls, name) -> io.NodeOutput:
        if name == model_files.NO_FILE:
            raise SafeRoPEInputError(cls.NODE, "name", *cls.NONE_CHOSEN)
        try:
            content = cls.read(model_files.resolve_in(name, *cls.FOLDERS))
        except cls.ERROR as err:
            raise SafeRoPEInputError(cls.NODE, "name", str(err), cls.REMAKE) from None
        return cls.output(content)
