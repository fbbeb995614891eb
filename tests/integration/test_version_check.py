"""The pack refuses a ComfyUI older than it needs, at load time, with a message naming both versions."""

import shutil

import pytest

from bench import comfyui_env


def test_version_rule(pack):
    check = pack.saferope_comfy.version_check
    for ok in ("0.3.59", "0.3.64", "0.8.0", "1.0.0", "v0.4.1"):
        check.require_comfyui(ok, True)
    for old in ("0.3.58", "0.3.4", "0.2.9"):
        with pytest.raises(check.ComfyUITooOld, match=rf"needs ComfyUI 0\.3\.59 or newer; this is ComfyUI {old}"):
            check.require_comfyui(old, True)
    check.require_comfyui(None, True)  # no version file: the feature decides
    with pytest.raises(check.ComfyUITooOld, match="no attention override"):
        check.require_comfyui(None, False)
    check.check_running_comfyui()  # the ComfyUI under test is new enough


def test_old_comfyui_refuses_to_load_the_pack(comfy, tmp_path):
    """A real ComfyUI server whose version file says 0.3.58 logs the pack's import failure with the reason."""
    from comfy_server import ComfyServer

    old = tmp_path / "ComfyUI"
    shutil.copytree(comfyui_env.find_comfyui(), old, ignore=shutil.ignore_patterns("__pycache__"))
    (old / "comfyui_version.py").write_text('__version__ = "0.3.58"\n')
    with pytest.raises(RuntimeError, match="custom nodes failed to import") as err:
        with ComfyServer({"ComfyUI-SafeRoPE": comfyui_env.REPO}, comfyui=old):
            pass
    assert "SafeRoPE needs ComfyUI 0.3.59 or newer; this is ComfyUI 0.3.58" in str(err.value)
