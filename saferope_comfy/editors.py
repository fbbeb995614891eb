"""The editors: what the FLUX adapter runs inside one model call, for every feature of the pack.

An editor is an `Editor`: each hook is a documented method with a no-op default, and `needs_attention` says
whether the adapter must route the model's attention through `edit_attention` (otherwise attention runs untouched).

- RiskRotation (Apply Risk Rotation, Train Risk Rotations): rotates the pack's heads in their unsafe subspaces.
- QKCollector (Collect Q/K): records q/k of chosen text tokens into statistics.
- RiskObserver (LRS Visualize): averages every token's Latent Risk Score over the pack's heads.
- AttentionOutputCollector (Collect UVR Anchors): records per-head attention outputs of image tokens.
- UnsafeFlowRestriction (Restrict Unsafe Flow): detects unsafe patches and restricts their flow.
"""

from __future__ import annotations

import zlib

import torch

from ..saferope_core import QKStatistics, SafeRoPEPack, latent_risk_score, site_name
from ..saferope_core.uvr import UVRAnchors, patch_mask, patch_scores, reference_patches
from .flux_adapter import ModelCall


class Editor:
    """The adapter's view of an editor. Subclasses override the hooks they need."""

    needs_attention = False  # True: the adapter routes every attention call through edit_attention
    keeps_run_state = False  # True: each sampling run gets new_run_state() as `call.run_state`, dropped at its end

    @property
    def edits_qk(self) -> bool:
        """Whether this editor looks at q/k at all (it overrides edit_qk): editors of attention alone need no q/k
        patch."""
        return type(self).edit_qk is not Editor.edit_qk

    def new_run_state(self):
        """A fresh state for one sampling run (editors with keeps_run_state); model calls outside a sampler get
        `call.run_state` None."""
        return None

    def edit_qk(self, call: ModelCall, block: str, tokens: str, q: torch.Tensor, k: torch.Tensor):
        """q/k of `tokens` ('txt' or 'img') of `block` after the QK norm, before RoPE, [B, heads, L, head_dim];
        returns the (possibly new) q and k. Returning the same objects means nothing was edited."""
        return q, k

    def edit_attention(self, call: ModelCall, block: str, q, k, v, heads: int, attend):
        """A block's attention: post-RoPE q/k, v [B, heads, L, head_dim]; returns its output [B, L, heads *
        head_dim] before the output projection. `attend(q, k, v, key_bias=None)` runs the attention underneath,
        with an optional additive logit bias per key [B, L_keys]. Called only when needs_attention is True."""
        return attend(q, k, v)


class RiskRotation(Editor):
    """q/k editor: rotates the pack's selected heads for the chosen token types at a user strength."""

    def __init__(self, pack: SafeRoPEPack, strength: float, tokens: tuple[str, ...]):
        self.pack, self.strength, self.tokens = pack, strength, tokens
        self._by_device: dict[str, SafeRoPEPack] = {}

    def pack_on(self, device) -> SafeRoPEPack:
        key = str(device)
        if key not in self._by_device:
            self._by_device[key] = self.pack.to(device)
        return self._by_device[key]

    def edit_qk(self, call, block, tokens, q, k):
        if tokens not in self.tokens or block not in self.pack.blocks:
            return q, k
        pack = self.pack_on(q.device)
        return (pack.rotate(q, block, "q", tokens, self.strength), pack.rotate(k, block, "k", tokens, self.strength))


class QKCollector(Editor):
    """q/k editor that records the vectors of chosen text-token positions into statistics; never edits."""

    def __init__(self, stats: QKStatistics):
        self.stats = stats
        self.group: str | None = None
        self.positions: torch.Tensor | None = None

    def target(self, group: str | None, positions: list[int] | None = None) -> None:
        self.group = group
        self.positions = None if positions is None else torch.tensor(positions, dtype=torch.long)

    def edit_qk(self, call, block, tokens, q, k):
        if self.group is None or tokens != "txt":
            return q, k
        index = self.positions.to(q.device)
        for name, x in (("q", q), ("k", k)):
            chosen = x.index_select(2, index)  # [B, H, n, D]
            self.stats.add(
                self.group,
                site_name(block, "txt", name),
                chosen.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]),
            )
        return q, k


class RiskObserver(Editor):
    """q/k editor that averages, per token, the LRS of q and k over the pack's selected heads; never edits."""

    def __init__(self, pack: SafeRoPEPack):
        self.pack = pack
        self.total: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.layout = None  # token layout of the observed call
        self.context: torch.Tensor | None = None  # the text context the model received

    def edit_qk(self, call, block, tokens, q, k):
        self.layout = call.layout
        rot = self.pack.blocks.get(block)
        if rot is not None:
            index = rot.head_index().to(q.device)
            risk = 0.5 * (
                latent_risk_score(q.index_select(1, index), rot.basis_q[index].to(q.device))
                + latent_risk_score(k.index_select(1, index), rot.basis_k[index].to(q.device))
            )
            per_token = risk.mean(1).float().cpu()  # [B, L]
            self.total[tokens] = self.total.get(tokens, 0) + per_token
            self.count[tokens] = self.count.get(tokens, 0) + 1
        return q, k

    def mean(self, tokens: str) -> torch.Tensor | None:
        return self.total[tokens] / self.count[tokens] if tokens in self.total else None

    def reset(self) -> None:
        """Forget what was observed, before the next call."""
        self.total, self.count = {}, {}


class AttentionOutputCollector(Editor):
    """Attention editor that records per-head outputs of image tokens at one block; never edits."""

    needs_attention = True

    def __init__(self, stats: QKStatistics, block: str):
        self.stats, self.block = stats, block
        self.group: str | None = None

    def edit_attention(self, call, block, q, k, v, heads, attend):
        out = attend(q, k, v)
        if self.group is not None and block == self.block:
            lay = call.layout
            image = out[:, lay.txt : lay.txt + lay.img]
            self.stats.add(self.group, site_name(block, "img", "o"), image.reshape(-1, heads, q.shape[-1]))
        return out


class UnsafeFlowRestriction(Editor):
    """Attention editor: detect flagged patches at the anchors' block, restrict flow in the other blocks.

    The mask of a step is kept for the next start-up step of the same samples (same CFG branches, batch and size)
    in the sampling run's state, so the blocks before the detection block are restricted too; the state lives from
    the start of a sampling run to its end, so no run sees another's masks and nothing stays on the device.
    `on_detect`, when set, is called with each detection (scores, core and ring masks), for inspection.
    """

    needs_attention = True
    keeps_run_state = True

    def __init__(
        self, anchors: UVRAnchors, strength: float, threshold: float, sigma_start: float, min_patches: int = 2
    ):
        self.anchors, self.strength, self.threshold = anchors, strength, threshold
        self.sigma_start, self.min_patches = sigma_start, min_patches
        self.on_detect = None

    def new_run_state(self) -> dict:
        return {}  # samples key -> (sigma, core, ring) of their latest detection in this run

    def edit_attention(self, call, block, q, k, v, heads, attend):
        state = call.scratch.get(id(self)) or self._begin(call)
        if state["active"] is None:
            return attend(q, k, v)
        if block == self.anchors.block:
            out = attend(q, k, v)
            self._detect(call, out, heads, q.shape[-1], state)
            return out
        if not state["flagged"]:
            return attend(q, k, v)
        if call.layout.refs:
            return attend(q, k, v, key_bias=self._reference_bias(call, state["core"], state["ring"], q))
        return self._suppress(call, attend(q, k, v), state["core"], block)

    def _begin(self, call) -> dict:
        """Per-call state, computed once (no device sync per block): which samples are in the start-up steps and
        the mask carried from this run's previous step, if any."""
        sigma = call.sigma.reshape(-1).float().cpu()
        active = sigma >= self.sigma_start - 1e-6
        state = {"active": None, "core": None, "ring": None, "flagged": False}
        if self.strength != 0 and bool(active.any()):
            state["active"] = active
            state["core"], state["ring"] = self._previous_mask(call, float(sigma.max()))
            state["flagged"] = state["core"] is not None and bool(state["core"].any())
        call.scratch[id(self)] = state
        return state

    @staticmethod
    def _samples_key(call) -> tuple:
        lay = call.layout
        return tuple(call.transformer_options.get("cond_or_uncond", ())), lay.batch, lay.img_hw, lay.refs

    def _previous_mask(self, call, now: float):
        """(core, ring) detected for the same samples at an earlier step of this sampling run, or (None, None)."""
        if call.run_state is None:
            return None, None
        sigma, core, ring = call.run_state.get(self._samples_key(call), (None, None, None))
        if sigma is None or now >= sigma - 1e-6:  # nothing yet, or not an earlier step
            return None, None
        return core, ring

    def _detect(self, call, out, heads, head_dim, state):
        lay = call.layout
        image = out[:, lay.txt : lay.txt + lay.img].reshape(-1, heads, head_dim)
        scores = patch_scores(image, self.anchors.anchors, self.anchors.safe_mean).reshape(-1, *lay.img_hw)
        core, ring = patch_mask(scores, self.threshold, self.min_patches)
        keep = state["active"].to(core.device)[:, None, None]
        state["scores"], state["core"], state["ring"] = scores, core & keep, ring & keep
        state["flagged"] = bool(state["core"].any())
        if call.run_state is not None:
            call.run_state[self._samples_key(call)] = (float(call.sigma.max()), state["core"], state["ring"])
        if self.on_detect is not None:
            self.on_detect({k: state[k] for k in ("scores", "core", "ring")})

    def _suppress(self, call, out, core, block):
        lay = call.layout
        flagged = core.reshape(core.shape[0], -1)  # [B, img]
        image = out[:, lay.txt : lay.txt + lay.img]
        g = torch.Generator(device=image.device).manual_seed(zlib.crc32(block.encode()))  # fixed noise per block
        noise = torch.randn(image.shape, generator=g, device=image.device).to(image.dtype)  # drawn where it is used
        noise = noise * image.float().std().to(image.dtype)
        mix = 0.999 * self.strength
        restricted = torch.where(flagged.unsqueeze(-1), (1 - mix) * image + mix * noise, image)
        return torch.cat((out[:, : lay.txt], restricted, out[:, lay.txt + lay.img :]), dim=1)

    def _reference_bias(self, call, core, ring, q):
        lay = call.layout
        ref_ids = call.img_ids[0, lay.img : lay.img + sum(lay.refs)]
        target = reference_patches(ref_ids, lay.img_hw, list(lay.refs)).to(q.device)
        s = self.strength
        factors = torch.ones(core.shape[0], lay.total, device=q.device)
        flagged = core.reshape(core.shape[0], -1).any(-1, keepdim=True)  # samples with anything flagged
        factors[:, : lay.txt + lay.img] = torch.where(flagged, 1 + 0.1 * s, 1.0)
        ref = slice(lay.txt + lay.img, lay.total)
        factors[:, ref] = torch.where(ring.reshape(core.shape[0], -1)[:, target], 1 - 0.6 * s, factors[:, ref])
        factors[:, ref] = torch.where(core.reshape(core.shape[0], -1)[:, target], 1 - 0.8 * s, factors[:, ref])
        return torch.log(factors.clamp_min(1e-4))
