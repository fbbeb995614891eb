"""SafeRoPE's side of ComfyUI, under the node schemas (nodes/) and over the method (saferope_core): the model
wrapper and its editors, calling the model outside a sampler, the trainers, the model folders and the version
check. Nothing here imports nodes/."""
