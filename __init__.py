"""SafeRoPE for ComfyUI: safety inside FLUX attention (risk-aware q/k rotations in unsafe subspaces).

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS and WEB_DIRECTORY. Imported anywhere
else (pytest, a plain `import`), it registers nothing and imports nothing heavy.
"""

import importlib.util

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
