"""The SafeRoPE pack file: the contract between building a pack and applying it.

A `.safetensors` file (never pickle). Tensors, for every block that has selected heads:
  '<block>.basis_q', '<block>.basis_k'  [H, D, r]  orthonormal unsafe bases
  '<block>.heads'                       [H] uint8   1 = safety-critical head (only these rotate)
  '<block>.w_txt', '<block>.w_img'      [H, r, r]   rotation parameters W (A = W - W^T) for text / image tokens
and optionally 'hds.delta' [blocks, H], the head-selection table. Metadata key 'saferope' holds JSON: kind,
format_version, model shape, concepts, rank, thresholds, training recipe, blocks and a content hash.
Every problem with a file raises SafeRoPEPackError with a message that says what is wrong.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SafeRoPEPackError
from .files import check_header, read_safetensors, write_file
from .rotation import rotate_tokens, rotates, skew, skew_eigen
from .shape import ModelShape
from .subspaces import Subspaces

PACK_KIND = "saferope.pack"
PACK_FORMAT_VERSION = 1


@dataclass
class BlockRotation:
    """Rotation data of one block: bases for q and k, the selected-head mask and the text/image parameters.

    The selected heads' indices, whether each W rotates at all and the eigen-decomposition of each fixed W's skew
    part are worked out once (on the CPU, where packs are loaded) and moved with the block, so applying a pack makes
    no host-device sync. Setting a new W is seen."""

    basis_q: torch.Tensor
    basis_k: torch.Tensor
    heads: torch.Tensor  # bool [H]
    w_txt: torch.Tensor
    w_img: torch.Tensor
    index: torch.Tensor = field(init=False, repr=False, compare=False)  # selected heads, on the heads' device
    _moves: dict = field(init=False, repr=False, compare=False, default_factory=dict)  # kind -> (W, rotates)
    _eigen: dict = field(init=False, repr=False, compare=False, default_factory=dict)  # kind -> (W, lam, vec)

    def __post_init__(self):
        self.index = torch.nonzero(self.heads).flatten()

    def head_index(self) -> torch.Tensor:
        return self.index

    def moves(self, tokens: str) -> bool:
        """Whether the W of `tokens` ('txt' / 'img') rotates anything (worked out once per W tensor)."""
        w = self.w_txt if tokens == "txt" else self.w_img
        known = self._moves.get(tokens)
        if known is None or known[0] is not w:
            known = self._moves[tokens] = (w, rotates(w))
        return known[1]

    def eigen(self, tokens: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`skew_eigen` of the selected heads' float32 W - W^T of `tokens`, worked out once per W tensor; None for a
        W being trained (it changes every step)."""
        w = self.w_txt if tokens == "txt" else self.w_img
        if w.requires_grad:
            return None
        known = self._eigen.get(tokens)
        if known is None or known[0] is not w:
            with torch.no_grad():
                known = self._eigen[tokens] = (w, *skew_eigen(skew(w[self.index.to(w.device)].float())))
        return known[1], known[2]

    def to(self, device) -> BlockRotation:
        """A copy on `device` that keeps what was worked out here (no sync on the device)."""
        flags = {kind: self.moves(kind) for kind in ("txt", "img")}
        eigen = {kind: self.eigen(kind) if flags[kind] else None for kind in ("txt", "img")}
        out = copy.copy(self)
        for name in ("basis_q", "basis_k", "heads", "w_txt", "w_img"):
            setattr(out, name, getattr(self, name).to(device))
        out.index = self.index.to(device, copy=True)  # a tensor of this grad mode (training saves it for backward)
        mine = {kind: out.w_txt if kind == "txt" else out.w_img for kind in ("txt", "img")}
        out._moves = {kind: (mine[kind], flag) for kind, flag in flags.items()}
        out._eigen = {
            kind: (mine[kind], *(t.to(device) for t in found)) for kind, found in eigen.items() if found is not None
        }
        return out


@dataclass
class SafeRoPEPack:
    """Bases, selected heads and rotations for one or more concepts, with the metadata that describes them."""

    shape: ModelShape
    concepts: list[str]
    rank: int
    blocks: dict[str, BlockRotation]
    thresholds: dict = field(default_factory=lambda: {"lrs": 0.7, "hds": 0.5, "gate": None})
    recipe: dict = field(default_factory=dict)
    delta: torch.Tensor | None = None
    name: str = "pack"

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def from_subspaces(
        cls, subspaces: Subspaces, shape: ModelShape, concepts: list[str], name: str = "pack"
    ) -> SafeRoPEPack:
        """An untrained pack (W = 0, so it changes nothing yet) over the selected heads of `subspaces`."""
        if not subspaces.selected.any():
            raise SafeRoPEPackError("no safety-critical head was selected: the pack would be empty")
        blocks = {}
        r = subspaces.rank
        for row, block in enumerate(shape.block_names()):
            heads = subspaces.selected[row]
            if heads.any():
                zeros = torch.zeros(shape.heads, r, r)
                blocks[block] = BlockRotation(
                    subspaces.bases[block]["q"], subspaces.bases[block]["k"], heads.clone(), zeros, zeros.clone()
                )
        thresholds = {"lrs": subspaces.lrs_threshold, "hds": subspaces.hds_threshold, "gate": None}
        return cls(shape, list(concepts), r, blocks, thresholds, {"trained": False}, subspaces.delta.clone(), name)

    # --- applying -------------------------------------------------------------------------------------
    def heads_rotated(self) -> int:
        return int(sum(int(b.heads.sum()) for b in self.blocks.values()))

    def check_model(self, shape: ModelShape) -> None:
        """Raise SafeRoPEPackError naming the dimension when the pack was built for a different model."""
        problem = self.shape.mismatch(shape)
        if problem:
            raise SafeRoPEPackError(f"pack '{self.name}' does not fit this model ({problem})")

    def rotate(self, x: torch.Tensor, block: str, qk: str, tokens: str, strength: float = 1.0) -> torch.Tensor:
        """Rotate the selected heads of x [B, H, L, D] ('q' or 'k', 'txt' or 'img' tokens); others untouched."""
        rot = self.blocks.get(block)
        if rot is None or strength == 0 or not rot.moves(tokens):
            return x
        index = rot.index.to(x.device)
        basis = rot.basis_q if qk == "q" else rot.basis_k
        w = rot.w_txt if tokens == "txt" else rot.w_img
        chosen = x.index_select(1, index)
        gate = self.thresholds.get("gate")
        rotated = rotate_tokens(chosen, basis[index], w[index], strength, gate, True, rot.eigen(tokens))
        return x.index_copy(1, index, rotated)

    def to(self, device) -> SafeRoPEPack:
        """A copy with all tensors on `device` (parameters keep requires_grad only if already on it)."""
        blocks = {n: b.to(device) for n, b in self.blocks.items()}
        delta = None if self.delta is None else self.delta.to(device)
        return SafeRoPEPack(
            self.shape,
            list(self.concepts),
            self.rank,
            blocks,
            dict(self.thresholds),
            dict(self.recipe),
            delta,
            self.name,
        )

    # --- the file -------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, b in self.blocks.items():
            out[f"{name}.basis_q"] = b.basis_q.detach().float()
            out[f"{name}.basis_k"] = b.basis_k.detach().float()
            out[f"{name}.heads"] = b.heads.to(torch.uint8)
            out[f"{name}.w_txt"] = b.w_txt.detach().float()
            out[f"{name}.w_img"] = b.w_img.detach().float()
        if self.delta is not None:
            out["hds.delta"] = self.delta.detach().float()
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict:
        return {
            "kind": PACK_KIND,
            "format_version": PACK_FORMAT_VERSION,
            "model": self.shape.to_dict(),
            "concepts": list(self.concepts),
            "rank": self.rank,
            "thresholds": dict(self.thresholds),
            "recipe": dict(self.recipe),
            "blocks": sorted(self.blocks, key=self.shape.block_names().index),
        }

    def save(self, path) -> Path:
        return write_file(path, self.tensors(), self.metadata())

    def describe(self) -> str:
        """One paragraph for the node UI: concept, rank, heads rotated, model it was built for."""
        trained = "trained" if self.recipe.get("trained", True) else "untrained (rotations are zero)"
        return (
            f"{', '.join(self.concepts) or '(no concept)'} | rank {self.rank} | {self.heads_rotated()} heads in "
            f"{len(self.blocks)} blocks | {trained} | for {self.shape.describe()}"
        )


ORTHONORMAL_TOLERANCE = 1e-3


def orthonormal(bases: torch.Tensor) -> bool:
    """Whether every basis [.., D, r] has orthonormal columns: U^T U = I within ORTHONORMAL_TOLERANCE."""
    u = bases.double()
    gram = u.transpose(-1, -2) @ u
    return bool((gram - torch.eye(u.shape[-1], dtype=u.dtype)).abs().max() <= ORTHONORMAL_TOLERANCE)


def load_pack(path) -> SafeRoPEPack:
    """Read and fully validate a pack file. Raises SafeRoPEPackError with what is wrong."""
    path = Path(path)
    tensors, meta = read_safetensors(path, SafeRoPEPackError)
    return pack_from_parts(tensors, meta, path.name)


def pack_from_parts(tensors: dict, meta: dict, name: str) -> SafeRoPEPack:
    def fail(msg: str):
        raise SafeRoPEPackError(f"{name}: {msg}")

    check_header(tensors, meta, name, PACK_KIND, PACK_FORMAT_VERSION, "SafeRoPE pack", SafeRoPEPackError)
    for key in ("model", "concepts", "rank", "thresholds", "recipe", "blocks"):
        if key not in meta:
            fail(f"metadata field '{key}' is missing")
    try:
        shape = ModelShape.from_dict(meta["model"])
    except ValueError as err:
        fail(str(err))
    rank = meta["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= shape.head_dim:
        fail(f"rank {rank!r} is not between 1 and head_dim {shape.head_dim}")
    if not isinstance(meta["concepts"], list) or not all(isinstance(c, str) for c in meta["concepts"]):
        fail("'concepts' must be a list of names")
    if not isinstance(meta["thresholds"], dict) or not isinstance(meta["recipe"], dict):
        fail("'thresholds' and 'recipe' must be JSON objects")
    gate = meta["thresholds"].get("gate")
    if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate < 1):
        fail(f"gate threshold {gate!r} is not a number in [0, 1)")
    if not isinstance(meta["blocks"], list):
        fail("malformed metadata: 'blocks' must be a list of block names")
    names = shape.block_names()
    h, d = shape.heads, shape.head_dim
    expected = {
        "basis_q": (h, d, rank),
        "basis_k": (h, d, rank),
        "heads": (h,),
        "w_txt": (h, rank, rank),
        "w_img": (h, rank, rank),
    }
    blocks, wanted = {}, set()
    for block in meta["blocks"]:
        if not isinstance(block, str) or block not in names:
            fail(f"block '{block}' does not exist in a {shape.double_blocks}+{shape.single_blocks}-block model")
        parts = {}
        for part, dims in expected.items():
            key = f"{block}.{part}"
            wanted.add(key)
            if key not in tensors:
                fail(f"tensor '{key}' is missing")
            t = tensors[key]
            if tuple(t.shape) != dims:
                fail(f"tensor '{key}' has shape {tuple(t.shape)}, expected {dims}")
            if part != "heads" and not t.is_floating_point():
                fail(f"tensor '{key}' has dtype {t.dtype}, expected a float type")
            if part != "heads" and not torch.isfinite(t).all():
                fail(f"tensor '{key}' contains NaN or Inf")
            parts[part] = t
        if not parts["heads"].any():
            fail(f"block '{block}' is listed but selects no head")
        parts["heads"] = parts["heads"].bool()
        for part in ("basis_q", "basis_k"):
            if not orthonormal(parts[part][parts["heads"]]):
                fail(
                    f"tensor '{block}.{part}' is not orthonormal (U^T U differs from I by more than "
                    f"{ORTHONORMAL_TOLERANCE}): the bases were damaged or scaled"
                )
        blocks[block] = BlockRotation(**{k: parts[k].float() if k != "heads" else parts[k] for k in expected})
    delta = tensors.get("hds.delta")
    if delta is not None:
        wanted.add("hds.delta")
        if tuple(delta.shape) != (len(names), h):
            fail(f"tensor 'hds.delta' has shape {tuple(delta.shape)}, expected {(len(names), h)}")
        if not delta.is_floating_point():
            fail(f"tensor 'hds.delta' has dtype {delta.dtype}, expected a float type")
        if not torch.isfinite(delta).all():
            fail("tensor 'hds.delta' contains NaN or Inf")
    extra = set(tensors) - wanted
    if extra:
        fail(f"unexpected tensors {sorted(extra)[:3]}")
    if not blocks:
        fail("the pack rotates no block")
    return SafeRoPEPack(
        shape,
        meta["concepts"],
        rank,
        blocks,
        meta["thresholds"],
        meta["recipe"],
        None if delta is None else delta.float(),
        name,
    )
