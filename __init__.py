"""SafeRoPE for ComfyUI: safety inside FLUX attention (risk-aware q/k rotations in unsafe subspaces).

ComfyUI imports this folder as a package and reads `comfy_entrypoint` (V3 nodes) and WEB_DIRECTORY. Imported
anywhere else (pytest, a plain `import`), it registers nothing and imports nothing heavy.
"""

import importlib.util

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint

    __all__ += ["comfy_entrypoint"]
