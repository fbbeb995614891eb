"""The import graph: nodes/ (schemas) over saferope_comfy/ (ComfyUI glue) over saferope_core/ (the method), with no
import running back up, no node file importing another, and no ComfyUI in saferope_core. Read from the sources."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("nodes", "saferope_comfy", "saferope_core")  # top to bottom
SHARED_NODE_FILES = {"common", "errors", "file_nodes", "guards", "training_run"}  # what node files may import of nodes/


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in a file, relative ones resolved to repository paths ('nodes.common')."""
    package = path.parent.relative_to(REPO).parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found += [(f"{module}.{alias.name}" if not node.module else module, node.lineno) for alias in node.names]
    return found


def layer_files(layer: str) -> list[Path]:
    return sorted((REPO / layer).glob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_runs_back_up(layer):
    above = LAYERS[: LAYERS.index(layer)]
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in layer_files(layer)
        for module, line in imports(path)
        if module.split(".")[0] in above
    ]
    assert layer_files(layer) and not wrong, wrong


def test_the_method_imports_no_comfyui():
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in layer_files("saferope_core")
        for module, line in imports(path)
        if module.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "comfy_extras", "nodes")
    ]
    assert not wrong, wrong


def test_no_node_file_imports_another():
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in layer_files("nodes")
        if path.stem != "__init__"
        for module, line in imports(path)
        if module.startswith("nodes.") and module.split(".")[1] not in SHARED_NODE_FILES
    ]
    assert not wrong, wrong


def test_imports_are_resolved_to_repository_paths():
    """The reading itself: a relative import of the glue from a node file is seen as 'saferope_comfy...'."""
    found = {module for module, _ in imports(REPO / "nodes" / "guards.py")}
    assert "saferope_comfy.flux_adapter" in found and "nodes.common" in found, found
