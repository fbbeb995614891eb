"""ComfyUI tier: every test here runs against a real ComfyUI checkout, or is skipped with one clear reason."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
for folder in (TESTS, TESTS.parent):  # tests/ (comfy_server, make_workflows) and the repository (bench.comfyui_env)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

from bench import comfyui_env  # noqa: E402

COMFYUI = comfyui_env.find_comfyui()
SKIP_REASON = (
    "ComfyUI tier did not run: no ComfyUI checkout (COMFYUI_PATH="
    f"{os.environ.get('COMFYUI_PATH')!r}, ~/ComfyUI, or the ComfyUI around custom_nodes/)"
)


def pytest_collection_modifyitems(config, items):
    if COMFYUI is None:
        skip = pytest.mark.skip(reason=SKIP_REASON)
        for item in items:
            if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported on the CPU (session-wide)."""
    return comfyui_env.import_comfyui(COMFYUI)


@pytest.fixture(scope="session")
def pack(comfy):
    """This repository imported as ComfyUI imports a custom node package: `pack.nodes`, `pack.saferope_core`."""
    return comfyui_env.import_pack()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pack):
    """The pack's model folders (saferope, saferope_statistics, saferope_training, saferope_anchors), redirected to
    a temp dir."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    names = pack.saferope_comfy.model_files.FOLDERS

    def forget_file_lists():  # folder_paths caches file lists per folder name
        for name in names:
            folder_paths.filename_list_cache.pop(name, None)

    forget_file_lists()
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.setitem(folder_paths.folder_names_and_paths, name, ([str(root / name)], {".safetensors"}))
        yield {name: root / name for name in names}
    forget_file_lists()
