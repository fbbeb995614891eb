"""The `saferope` models folder (ComfyUI/models/saferope, plus extra_model_paths.yaml entries)."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "saferope"  # packs (trained, or untrained subspaces)
STATS_FOLDER = "saferope_statistics"  # collected q/k statistics
TRAINING_FOLDER = "saferope_training"  # resumable training checkpoints
EXTENSIONS = {".safetensors"}


def register_folders() -> None:
    """Register both folders with folder_paths, keeping paths configured elsewhere; only .safetensors files."""
    for name in (FOLDER, STATS_FOLDER, TRAINING_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in paths:
            paths = [*paths, default]
        folder_paths.folder_names_and_paths[name] = (paths, set(EXTENSIONS))


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
