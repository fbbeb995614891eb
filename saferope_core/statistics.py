"""Streaming per-head q/k statistics: Gram matrices (for subspaces) and reservoir samples (for head selection).

A site is one place vectors are taken from: '<block>.<stream>.<q|k>', e.g. 'double.3.txt.q'. Vectors arrive as
[N, H, D] (N tokens, all heads at once). Memory is fixed by the model shape and the reservoir size, never by the
number of prompts; two collections merge by addition.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import StatisticsError
from .files import check_header, read_safetensors, write_file
from .shape import ModelShape

GROUPS = ("unsafe", "safe")
STATISTICS_KIND = "saferope.statistics"
STATISTICS_VERSION = 1


def site_name(block: str, stream: str, kind: str) -> str:
    """'<block>.<txt|img>.<q|k|o>': queries, keys, or per-head attention outputs (o, used by UVR anchors)."""
    if stream not in ("txt", "img") or kind not in ("q", "k", "o"):
        raise ValueError(f"bad site stream/kind: {stream!r}, {kind!r}")
    return f"{block}.{stream}.{kind}"


class QKStatistics:
    """Per (group, site): Gram matrix [H, D, D], vector count, and a uniform reservoir sample [<=cap, H, D]."""

    def __init__(self, shape: ModelShape, reservoir_size: int = 512, seed: int = 0, concepts: list[str] | None = None):
        if reservoir_size < 1:
            raise ValueError("reservoir_size must be at least 1")
        self.shape = shape
        self.concepts = list(concepts or [])
        self.reservoir_size = reservoir_size
        self.seed = seed
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.reservoir: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def key(group: str, site: str) -> str:
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        return f"{group}/{site}"

    def add(self, group: str, site: str, vectors: torch.Tensor) -> None:
        """Accumulate vectors [N, H, D] of one site."""
        key = self.key(group, site)
        n, heads, dim = vectors.shape
        if (heads, dim) != (self.shape.heads, self.shape.head_dim):
            raise ValueError(
                f"vectors for {site} have {heads} heads x {dim} dims, expected "
                f"{self.shape.heads} x {self.shape.head_dim}"
            )
        if n == 0:
            return
        v = vectors.detach().float()
        by_head = v.transpose(0, 1)  # [H, N, D]
        gram = by_head.transpose(1, 2) @ by_head
        self.gram[key] = self.gram[key] + gram if key in self.gram else gram
        seen = self.count.get(key, 0)
        self.count[key] = seen + n
        self._reservoir_add(key, v.cpu(), seen)

    def _reservoir_add(self, key: str, v: torch.Tensor, seen: int) -> None:
        """Algorithm R, vectorised: item j (global index seen+j) replaces a random slot with prob cap/(seen+j+1)."""
        cap = self.reservoir_size
        kept = self.reservoir.get(key, v[:0])
        fill = min(cap - kept.shape[0], v.shape[0])
        if fill > 0:
            kept = torch.cat([kept, v[:fill]])
        rest = v[fill:]
        if rest.shape[0]:
            index = torch.arange(rest.shape[0]) + seen + fill
            slot = (torch.rand(rest.shape[0], generator=self._generator, dtype=torch.float64) * (index + 1)).long()
            take = slot < cap
            slots, items = slot[take], torch.nonzero(take).squeeze(1)
            if slots.numel():  # when two items hit one slot, the later one wins, as in the sequential algorithm
                unique, inverse = torch.unique(slots, return_inverse=True)
                last = torch.full_like(unique, -1).scatter_reduce(0, inverse, items, "amax")
                kept = kept.clone()
                kept[unique] = rest[last]
        self.reservoir[key] = kept

    def merged(self, other: QKStatistics) -> QKStatistics:
        """Statistics of both collections: Gram matrices and counts add; reservoirs are subsampled by count."""
        problem = self.shape.mismatch(other.shape)
        if problem:
            raise StatisticsError(f"cannot merge statistics of different models ({problem})")
        concepts = self.concepts + [c for c in other.concepts if c not in self.concepts]
        out = QKStatistics(self.shape, min(self.reservoir_size, other.reservoir_size), self.seed, concepts)
        out._generator = self._generator
        for key in sorted(set(self.count) | set(other.count)):
            parts = [s for s in (self, other) if key in s.count]
            out.gram[key] = sum(s.gram[key].cpu() for s in parts)
            out.count[key] = sum(s.count[key] for s in parts)
            out.reservoir[key] = out._mix_reservoirs([(s.reservoir[key], s.count[key]) for s in parts])
        return out

    def _mix_reservoirs(self, parts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        total = sum(n for _, n in parts)
        want = min(self.reservoir_size, sum(r.shape[0] for r, _ in parts))
        chosen = []
        for i, (res, n) in enumerate(parts):
            k = want - sum(c.shape[0] for c in chosen) if i == len(parts) - 1 else round(want * n / total)
            k = min(k, res.shape[0])
            chosen.append(res[torch.randperm(res.shape[0], generator=self._generator)[:k]])
        return torch.cat(chosen)

    def sites(self, group: str) -> list[str]:
        prefix = f"{group}/"
        return sorted(k[len(prefix) :] for k in self.count if k.startswith(prefix))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.gram, self.reservoir) for t in d.values())

    def save(self, path) -> None:
        tensors = {}
        for key in self.count:
            tensors[f"gram/{key}"] = self.gram[key]
            tensors[f"reservoir/{key}"] = self.reservoir[key]
        meta = {
            "kind": STATISTICS_KIND,
            "format_version": STATISTICS_VERSION,
            "model": self.shape.to_dict(),
            "reservoir_size": self.reservoir_size,
            "seed": self.seed,
            "concepts": self.concepts,
            "count": self.count,
        }
        write_file(path, tensors, meta)

    @classmethod
    def load(cls, path) -> QKStatistics:
        """Load saved statistics; raises StatisticsError saying what is wrong."""
        tensors, meta = read_safetensors(path, StatisticsError)
        name = Path(path).name
        check_header(
            tensors,
            meta,
            name,
            STATISTICS_KIND,
            STATISTICS_VERSION,
            "statistics file",
            StatisticsError,
            hash_required=False,  # statistics were written without a hash before December 2026
        )
        try:
            shape = ModelShape.from_dict(meta.get("model"))
        except ValueError as err:
            raise StatisticsError(f"{name}: {err}") from None
        fields = {key: meta.get(key) for key in ("reservoir_size", "seed")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields.values()):
            raise StatisticsError(f"{name}: malformed metadata {fields}")
        counts, concepts = meta.get("count"), meta.get("concepts", [])
        if not isinstance(counts, dict) or not isinstance(concepts, list):
            raise StatisticsError(f"{name}: malformed metadata: 'count' must map sites to counts")
        stats = cls(shape, max(fields["reservoir_size"], 1), fields["seed"], [str(c) for c in concepts])
        for key, n in counts.items():
            for part in ("gram", "reservoir"):
                if f"{part}/{key}" not in tensors:
                    raise StatisticsError(f"{name} is missing tensor {part}/{key}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise StatisticsError(f"{name}: count of {key} is {n!r}, not a number of vectors")
            stats.gram[key] = tensors[f"gram/{key}"]
            stats.reservoir[key] = tensors[f"reservoir/{key}"]
            stats.count[key] = n
        return stats
