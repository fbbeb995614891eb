"""Errors a user reads on a node: which node, which input, what is wrong, how to fix it."""


class SafeRoPEInputError(ValueError):
    """Bad input to a SafeRoPE node. ComfyUI shows the message on the node."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str = ""):
        self.node, self.input_name = node, input_name
        message = f"{node}, input '{input_name}': {problem}"
        super().__init__(f"{message}. {fix}" if fix else message)


def require_flux(node: str, model):
    """The model's shape, or an error on `node`'s 'model' input naming what was found instead of FLUX."""
    from .flux_adapter import NotFluxError, model_shape

    try:
        return model_shape(model)
    except NotFluxError as err:
        raise SafeRoPEInputError(node, "model", str(err)) from None


def require_pack_fits(node: str, input_name: str, pack, model, fix: str):
    """The model's shape, after checking that `pack` (or subspaces) was built for it; else an error naming both."""
    from ..saferope_core import SafeRoPEPackError

    shape = require_flux(node, model)
    try:
        pack.check_model(shape)
    except SafeRoPEPackError as err:
        raise SafeRoPEInputError(node, input_name, str(err), fix) from None
    return shape
