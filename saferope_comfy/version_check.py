"""The oldest ComfyUI the pack runs on, checked when ComfyUI loads the pack (never by silently doing nothing)."""

from __future__ import annotations

import re

MINIMUM_COMFYUI = (0, 3, 59)  # Restrict Unsafe Flow relies on optimized_attention_override, new in ComfyUI 0.3.59


class ComfyUITooOld(ImportError):
    """ComfyUI is older than the pack needs; ComfyUI shows this as the pack's import failure."""


def parse_version(text: str) -> tuple[int, ...]:
    numbers = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if numbers is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(x) for x in numbers.group(1).split("."))


def require_comfyui(version: str | None, has_attention_override: bool) -> None:
    """Raise ComfyUITooOld naming both versions when `version` is older than MINIMUM_COMFYUI. Without a version
    (a ComfyUI that does not say), the feature the pack needs decides."""
    minimum = ".".join(map(str, MINIMUM_COMFYUI))
    if version is None:
        if not has_attention_override:
            raise ComfyUITooOld(
                f"SafeRoPE needs ComfyUI {minimum} or newer (this ComfyUI has no attention override "
                "and does not say its version). Update ComfyUI, then restart it"
            )
        return
    if parse_version(version) < MINIMUM_COMFYUI:
        raise ComfyUITooOld(
            f"SafeRoPE needs ComfyUI {minimum} or newer; this is ComfyUI {version}. Update ComfyUI "
            "(git pull, or ComfyUI-Manager > Update ComfyUI), then restart it"
        )


def check_running_comfyui() -> None:
    """require_comfyui for the ComfyUI this process runs."""
    try:
        import comfyui_version

        version = comfyui_version.__version__
    except (ImportError, AttributeError):
        version = None
    import comfy.ldm.modules.attention as attention

    require_comfyui(version, hasattr(attention, "wrap_attn"))
