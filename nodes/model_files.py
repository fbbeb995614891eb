"""The pack's model folders (ComfyUI/models/saferope*, plus extra_model_paths.yaml entries).

UVR anchors were saved in the statistics folder before they got a folder of their own: anchor files found there
still load (Load UVR Anchors lists them), and Load Statistics lists only statistics files."""

from __future__ import annotations

import os

import folder_paths

from ..saferope_core.files import file_kind

FOLDER = "saferope"  # packs (trained, or untrained subspaces)
STATS_FOLDER = "saferope_statistics"  # collected q/k statistics
TRAINING_FOLDER = "saferope_training"  # resumable training checkpoints
ANCHORS_FOLDER = "saferope_anchors"  # UVR anchors
FOLDERS = (FOLDER, STATS_FOLDER, TRAINING_FOLDER, ANCHORS_FOLDER)
EXTENSIONS = {".safetensors"}


def register_folders() -> None:
    """Register the folders with folder_paths, keeping paths configured elsewhere; only .safetensors files. Each
    default folder is created, so users see where packs go."""
    for name in FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in paths:
            paths = [*paths, default]
        folder_paths.folder_names_and_paths[name] = (paths, set(EXTENSIONS))
        os.makedirs(default, exist_ok=True)


def files_of_kind(kind: str, *folders: str) -> list[str]:
    """Files in `folders` (folder_paths names) whose metadata says `kind`, sorted, each listed once."""
    names = set()
    for folder in folders:
        for name in folder_paths.get_filename_list(folder):
            path = folder_paths.get_full_path(folder, name)
            if path is not None and file_kind(path) == kind:
                names.add(name)
    return sorted(names)


def resolve_in(name: str, *folders: str) -> str:
    """The path of `name` in the first of `folders` that has it (folder_paths raises for the last one)."""
    for folder in folders[:-1]:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    return folder_paths.get_full_path_or_raise(folders[-1], name)


def pack_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def resolve(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def output_dir(folder: str = FOLDER) -> str:
    """The first path of a folder: where new files are written."""
    path = folder_paths.get_folder_paths(folder)[0]
    os.makedirs(path, exist_ok=True)
    return path


def download_from_hub(repo_id: str, filename: str) -> str:
    """The pack `filename` of Hugging Face repo `repo_id`, downloaded into the saferope folder only if missing."""
    local = os.path.join(output_dir(), os.path.basename(filename))
    if os.path.isfile(local):
        return local
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id=repo_id, filename=filename, local_dir=output_dir())
    if os.path.abspath(path) != os.path.abspath(local):
        os.replace(path, local)
    return local
