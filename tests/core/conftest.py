"""Shared fixtures of the core tests: a small model shape and a factory of random, valid packs."""

import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` from the repo root finds saferope_core through the cwd; plain `pytest` or another cwd does not
REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from saferope_core import BlockRotation, ModelShape, SafeRoPEPack  # noqa: E402


def _orthonormal(heads: int, dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Random orthonormal bases [heads, dim, rank]."""
    return torch.linalg.qr(torch.randn(heads, dim, rank, generator=generator))[0].contiguous()


@pytest.fixture
def shape() -> ModelShape:
    """A tiny FLUX-like model: 2 double + 2 single blocks, 4 heads of dimension 8."""
    return ModelShape("flux", double_blocks=2, single_blocks=2, heads=4, head_dim=8)


@pytest.fixture
def orthonormal():
    return _orthonormal


@pytest.fixture
def make_pack(shape):
    """make_pack(seed, rank=3, gate=None, blocks={'double.1': [1, 0, 1, 0], ...}) -> a random trained pack."""

    def make(seed: int = 0, rank: int = 3, gate=None, blocks=None, scale: float = 1.0) -> SafeRoPEPack:
        g = torch.Generator().manual_seed(seed)
        blocks = blocks or {"double.1": [1, 0, 1, 0], "single.0": [0, 1, 1, 1]}
        h, d = shape.heads, shape.head_dim
        rotations = {
            name: BlockRotation(
                _orthonormal(h, d, rank, g),
                _orthonormal(h, d, rank, g),
                torch.tensor(mask, dtype=torch.bool),
                scale * torch.randn(h, rank, rank, generator=g),
                scale * torch.randn(h, rank, rank, generator=g),
            )
            for name, mask in blocks.items()
        }
        delta = torch.rand(len(shape.block_names()), h, generator=g)
        return SafeRoPEPack(
            shape,
            ["test concept"],
            rank,
            rotations,
            thresholds={"lrs": 0.7, "hds": 0.5, "gate": gate},
            recipe={"trained": True, "steps": 3},
            delta=delta,
            name="test",
        )

    return make
