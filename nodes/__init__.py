"""ComfyUI nodes of the SafeRoPE pack (thin: inputs -> saferope_core -> outputs) and the FLUX adapter."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
