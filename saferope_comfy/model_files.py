"""The pack's model folders (ComfyUI/models/saferope*, plus extra_model_paths.yaml entries).

UVR anchors were saved in the statistics folder before they got a folder of their own: anchor files found there
still load (Load UVR Anchors lists them), and Load Statistics lists only statistics files."""

from __future__ import annotations

import os
import shutil

import folder_paths

from ..saferope_core.files import file_kind

FOLDER = "saferope"  # packs (trained, or untrained subspaces)
STATS_FOLDER = "saferope_statistics"  # collected q/k statistics
TRAINING_FOLDER = "saferope_training"  # resumable training checkpoints
ANCHORS_FOLDER = "saferope_anchors"  # UVR anchors
REDIRECTOR_FOLDER = "saferope_redirectors"  # prompt redirectors
FOLDERS = (FOLDER, STATS_FOLDER, TRAINING_FOLDER, ANCHORS_FOLDER, REDIRECTOR_FOLDER)
EXTENSIONS = {".safetensors"}
NO_FILE = "none"  # the first choice of every loader's file list: a clear error instead of an empty list


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


def fingerprint(path: str | None) -> str:
    """For a loader's `fingerprint_inputs`: the file's modification time, size and inode, which change whenever it
    is saved again (saves replace the file), so ComfyUI reloads it under every cache mode. Empty when there is no
    such file: the loader then runs and says why."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}" if st else ""


def fingerprint_in(name: str, *folders: str) -> str:
    """fingerprint() of `name` in the first of `folders` that has it (as resolve_in finds it)."""
    try:
        return fingerprint(resolve_in(name, *folders))
    except FileNotFoundError:
        return ""


def pack_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def resolve(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def output_dir(folder: str = FOLDER) -> str:
    """The first path of a folder: where new files are written."""
    path = folder_paths.get_folder_paths(folder)[0]
    os.makedirs(path, exist_ok=True)
    return path


HUB_FOLDER = "hub"  # downloads go to models/saferope/hub/<owner>/<repo>/<file>: each repo has its own place


class HubDownloadError(ValueError):
    """A Hub download that cannot be made; `input_name` says which node input to fix."""

    def __init__(self, input_name: str, message: str):
        self.input_name = input_name
        super().__init__(message)


def hub_path(repo_id: str, filename: str) -> str:
    """Where `filename` of Hub repo `repo_id` lives in the saferope folder (validated; nothing is created)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubDownloadError("hf_repo_id", f"'{repo_id}' is not a Hugging Face repo id ({err})") from None
    if "/" not in repo_id:
        raise HubDownloadError("hf_repo_id", f"'{repo_id}' is not a repo id of the form owner/name")
    parts = filename.split("/")
    if (
        len(filename) > 200
        or "\\" in filename
        or "\0" in filename
        or filename.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
        or not filename.endswith(".safetensors")
    ):
        raise HubDownloadError("hf_filename", f"'{filename}' is not a .safetensors file path inside a repo")
    return os.path.join(output_dir(), HUB_FOLDER, *repo_id.split("/"), *parts)


def download_from_hub(repo_id: str, filename: str) -> str:
    """The pack `filename` of Hub repo `repo_id`, downloaded into its own place in the saferope folder only if it
    is not there yet. Offline (HF_HUB_OFFLINE) or unreachable, it fails at once with the reason, and leaves no
    empty folder behind."""
    local = hub_path(repo_id, filename)
    if os.path.isfile(local):
        return local
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise HubDownloadError(
            "hf_repo_id",
            f"{repo_id}/{filename} is not in {os.path.dirname(local)} and the "
            "Hugging Face Hub is off (HF_HUB_OFFLINE is set)",
        )
    repo_dir = os.path.join(output_dir(), HUB_FOLDER, *repo_id.split("/"))
    created = not os.path.exists(repo_dir)
    try:
        path = hf_hub_download(repo_id=repo_id, filename=filename, local_dir=repo_dir, etag_timeout=5)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        if created:  # the repo's folder holds only what this failed download left (locks, partial files)
            shutil.rmtree(repo_dir, ignore_errors=True)
        _remove_empty_folders(os.path.dirname(repo_dir), output_dir())
        raise HubDownloadError(
            "hf_repo_id",
            f"could not download {filename} from {repo_id}: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
        ) from None
    return str(path)


def _remove_empty_folders(folder: str, stop: str) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    folder, stop = os.path.abspath(folder), os.path.abspath(stop)
    while folder.startswith(stop + os.sep) and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
        folder = os.path.dirname(folder)
