"""Each guard applied to a model, after checking it fits, with errors naming the node and input: what Apply Risk
Rotation, Redirect Unsafe Prompts, Restrict Unsafe Flow and Apply Safety Pack share."""

from __future__ import annotations

from ..saferope_comfy.editors import RiskRotation, UnsafeFlowRestriction
from ..saferope_comfy.flux_adapter import with_qk_editor
from ..saferope_comfy.prompt_redirect import RedirectWrapper, refuse_other_model, with_redirection
from .common import require_flux, require_pack_fits
from .errors import SafeRoPEInputError


def rotated(node: str, input_name: str, model, pack, strength: float, tokens: tuple[str, ...]):
    """A clone of `model` whose q/k the pack rotates (after checking the pack fits it; errors name node and input)."""
    require_pack_fits(node, input_name, pack, model, "Use a pack built for this model")
    return with_qk_editor(model, RiskRotation(pack, strength, tokens))


def redirected(node: str, input_name: str, model, redirector, strength: float, threshold: float, cooldown: int):
    """A clone of `model` whose flagged samples the redirector redirects (after checking it fits the model; errors
    name node and input)."""
    require_flux(node, model)
    problem = refuse_other_model(redirector.config, model)
    if problem:
        raise SafeRoPEInputError(
            node, input_name, f"the redirector does not fit this model: {problem}", "Train one on this model"
        )
    return with_redirection(model, RedirectWrapper(redirector, strength, threshold, cooldown))


def restricted(
    node: str, input_name: str, model, anchors, strength: float, threshold: float, sigma_start: float, block=-1
):
    """A clone of `model` whose unsafe flow UVR restricts (after checking the anchors fit it; errors name node and
    input). `block`: the detection block, -1 for the anchors' own."""
    shape = require_flux(node, model)
    problem = anchors.shape.mismatch(shape)
    if problem:
        raise SafeRoPEInputError(
            node,
            input_name,
            f"anchors were collected on another model ({problem})",
            "Collect UVR Anchors on this model",
        )
    if block >= 0 and f"single.{block}" != anchors.block:
        raise SafeRoPEInputError(
            node,
            "detection_block",
            f"the anchors belong to {anchors.block}",
            "Leave -1, or collect anchors at that block",
        )
    return with_qk_editor(model, UnsafeFlowRestriction(anchors, strength, threshold, sigma_start))
