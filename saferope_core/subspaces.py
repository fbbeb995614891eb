"""Unsafe subspaces per (block, head, q|k) and the selection of safety-critical heads (HDS, paper eq. 4-5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import StatisticsError
from .rotation import latent_risk_score
from .statistics import QKStatistics


def subspace_basis(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` eigenvectors of per-head Gram matrices [H, D, D] -> orthonormal bases [H, D, rank].

    Eigenvectors of X X^T are the left singular vectors of the data X, so this is the paper's SVD step.
    """
    _, vectors = torch.linalg.eigh(gram.double())
    return vectors[..., -rank:].flip(-1).float().contiguous()


def high_risk_share(vectors: torch.Tensor, basis: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of vectors [N, H, D] whose LRS against bases [H, D, r] exceeds `threshold`, per head -> [H]."""
    if vectors.shape[0] == 0:
        return torch.zeros(basis.shape[0])
    lrs = latent_risk_score(vectors.transpose(0, 1).unsqueeze(0), basis)[0]  # [H, N]
    return (lrs > threshold).float().mean(-1)


@dataclass
class Subspaces:
    """Bases of every block and the head-selection result."""

    bases: dict[str, dict[str, torch.Tensor]]  # block -> {"q": [H, D, r], "k": [H, D, r]}
    delta: torch.Tensor  # [blocks, H], blocks in shape.block_names() order
    selected: torch.Tensor  # [blocks, H] bool
    rank: int
    lrs_threshold: float
    hds_threshold: float

    def summary(self, block_names: list[str]) -> str:
        """Readable report: selected heads per block and the delta distribution."""
        lines = [
            f"rank {self.rank}, LRS > {self.lrs_threshold}, keep heads with delta >= {self.hds_threshold}",
            f"selected {int(self.selected.sum())} of {self.selected.numel()} heads",
        ]
        for name, row, sel in zip(block_names, self.delta, self.selected, strict=True):
            if sel.any():
                heads = ", ".join(f"h{int(h)} ({row[h]:.2f})" for h in torch.nonzero(sel).flatten())
                lines.append(f"  {name}: {heads}")
        q = torch.quantile(self.delta.flatten().float(), torch.tensor([0.0, 0.5, 0.9, 1.0]))
        lines.append("delta min/median/p90/max: " + " / ".join(f"{v:.2f}" for v in q.tolist()))
        return "\n".join(lines)


def _group_vectors(stats: QKStatistics, group: str, block: str, qk: str) -> torch.Tensor:
    parts = [
        stats.reservoir[stats.key(group, f"{block}.{s}.{qk}")]
        for s in ("txt", "img")
        if stats.key(group, f"{block}.{s}.{qk}") in stats.reservoir
    ]
    return torch.cat(parts) if parts else torch.zeros(0, stats.shape.heads, stats.shape.head_dim)


def build_subspaces(
    stats: QKStatistics, rank: int = 5, lrs_threshold: float = 0.7, hds_threshold: float = 0.5
) -> Subspaces:
    """Bases from the unsafe Gram matrices; delta = high-risk share (unsafe) - high-risk share (safe).

    The delta of a head averages its q and k deltas (the paper pools q and k vectors). Raises ValueError for a
    rank the data cannot support.
    """
    shape = stats.shape
    if not 1 <= rank <= shape.head_dim:
        raise StatisticsError(f"rank {rank} must be between 1 and the head dimension {shape.head_dim}")
    bases, deltas = {}, []
    for block in shape.block_names():
        bases[block], block_delta = {}, []
        for qk in ("q", "k"):
            keys = [stats.key("unsafe", f"{block}.{s}.{qk}") for s in ("txt", "img")]
            keys = [k for k in keys if k in stats.gram]
            count = sum(stats.count[k] for k in keys)
            if count < rank:
                raise StatisticsError(
                    f"block {block} {qk}: {count} unsafe vectors collected, fewer than rank {rank}; "
                    "collect more prompts or lower the rank"
                )
            basis = subspace_basis(sum(stats.gram[k].cpu() for k in keys), rank)
            bases[block][qk] = basis
            block_delta.append(
                high_risk_share(_group_vectors(stats, "unsafe", block, qk), basis, lrs_threshold)
                - high_risk_share(_group_vectors(stats, "safe", block, qk), basis, lrs_threshold)
            )
        deltas.append(torch.stack(block_delta).mean(0))
    delta = torch.stack(deltas)
    return Subspaces(bases, delta, delta >= hds_threshold, rank, lrs_threshold, hds_threshold)
