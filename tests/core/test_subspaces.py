"""Unsafe subspaces from collected statistics, and the selection of safety-critical heads (HDS)."""

import math

import pytest
import torch

from saferope_core import ModelShape, QKStatistics, SafeRoPEPack, SafeRoPEPackError, build_subspaces, subspace_basis

SHAPE = ModelShape("flux", double_blocks=1, single_blocks=1, heads=4, head_dim=16)
RANK = 3


def _principal_angles_deg(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Principal angles between the spans of orthonormal u1, u2 [D, r]: arccos of the singular values of u1^T u2."""
    cosines = torch.linalg.svdvals(u1.double().T @ u2.double()).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cosines))


def _planted(n: int, basis: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    """n vectors [n, D] = basis @ strong random coefficients + isotropic noise."""
    coeff = 3 * torch.randn(n, basis.shape[1], generator=g)
    return coeff @ basis.T + noise * torch.randn(n, basis.shape[0], generator=g)


def _sites(block: str):
    return [f"{block}.{stream}.{qk}" for stream in ("txt", "img") for qk in ("q", "k")]


def _stats_with_planted_heads(planted: dict[str, list[int]], seed: int = 0):
    """Unsafe vectors live in a random rank-3 subspace on the planted heads (isotropic elsewhere); safe isotropic.

    Returns the statistics and the true bases {block: {qk: [H, D, r]}}.
    """
    g = torch.Generator().manual_seed(seed)
    stats = QKStatistics(SHAPE, reservoir_size=256, seed=seed)
    truth = {}
    h, d = SHAPE.heads, SHAPE.head_dim
    for block in SHAPE.block_names():
        truth[block] = {qk: torch.linalg.qr(torch.randn(h, d, RANK, generator=g))[0] for qk in ("q", "k")}
        for site in _sites(block):
            qk = site[-1]
            unsafe = torch.randn(300, h, d, generator=g)
            for head in planted.get(block, []):
                unsafe[:, head] = _planted(300, truth[block][qk][head], 0.1, g)
            stats.add("unsafe", site, unsafe)
            stats.add("safe", site, torch.randn(300, h, d, generator=g))
    return stats, truth


def test_subspace_basis_is_top_eigenvectors():
    """Orthonormal [H, D, r] bases spanning the top-r eigenvectors of the Gram matrices, largest first."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 6, generator=g) * torch.tensor([5.0, 4.0, 3.0, 0.5, 0.4, 0.3])
    gram = x.transpose(1, 2) @ x
    basis = subspace_basis(gram, 3)
    assert basis.shape == (2, 6, 3) and basis.dtype == torch.float32
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    values, vectors = torch.linalg.eigh(gram.double())
    for head in range(2):
        assert _principal_angles_deg(basis[head], vectors[head, :, -3:]).max() < 0.1  # float32 rounding only
        energy = (gram[head].double() @ basis[head].double() * basis[head].double()).sum(0)  # Rayleigh quotients
        torch.testing.assert_close(energy, values[head, -3:].flip(0), rtol=1e-5, atol=1e-3)


def test_planted_subspace_is_recovered():
    """A subspace planted in noisy vectors is found: every principal angle below 5 degrees."""
    planted = {block: list(range(SHAPE.heads)) for block in SHAPE.block_names()}
    stats, truth = _stats_with_planted_heads(planted, seed=1)
    sub = build_subspaces(stats, rank=RANK)
    for block in SHAPE.block_names():
        for qk in ("q", "k"):
            basis = sub.bases[block][qk]
            assert basis.shape == (SHAPE.heads, SHAPE.head_dim, RANK)
            for head in range(SHAPE.heads):
                angles = _principal_angles_deg(basis[head], truth[block][qk][head])
                assert angles.max() < 5.0, f"{block} {qk} head {head}: {angles.tolist()}"


def test_q_and_k_get_their_own_bases():
    """q and k are collected at different sites and get different bases."""
    planted = {block: list(range(SHAPE.heads)) for block in SHAPE.block_names()}
    stats, _ = _stats_with_planted_heads(planted, seed=2)
    sub = build_subspaces(stats, rank=RANK)
    assert _principal_angles_deg(sub.bases["double.0"]["q"][0], sub.bases["double.0"]["k"][0]).max() > 30


def test_head_selection_finds_the_planted_heads():
    """Heads whose unsafe vectors sit in a low-rank subspace are selected; isotropic heads are rejected."""
    planted = {"double.0": [1, 3], "single.0": [0]}
    stats, _ = _stats_with_planted_heads(planted, seed=3)
    sub = build_subspaces(stats, rank=RANK, lrs_threshold=0.7, hds_threshold=0.5)
    names = SHAPE.block_names()
    assert sub.delta.shape == (len(names), SHAPE.heads)
    assert sub.selected.shape == sub.delta.shape and sub.selected.dtype == torch.bool
    expected = torch.zeros(len(names), SHAPE.heads, dtype=torch.bool)
    for block, heads in planted.items():
        expected[names.index(block), heads] = True
    assert torch.equal(sub.selected, expected)
    assert bool((sub.delta[expected] > 0.9).all())
    assert bool((sub.delta[~expected].abs() < 0.1).all())
    assert (sub.rank, sub.lrs_threshold, sub.hds_threshold) == (RANK, 0.7, 0.5)
    report = sub.summary(names)
    assert "selected 3 of 8 heads" in report and "double.0: h1" in report and "single.0: h0" in report


def test_safe_vectors_in_the_subspace_cancel_the_delta():
    """delta subtracts the safe share: a head where safe vectors are as risky as unsafe ones is not selected."""
    stats, truth = _stats_with_planted_heads({"double.0": [2]}, seed=4)
    g = torch.Generator().manual_seed(5)
    for site in _sites("double.0"):  # safe vectors now also live in head 2's unsafe subspace
        safe = torch.randn(2000, SHAPE.heads, SHAPE.head_dim, generator=g)
        safe[:, 2] = _planted(2000, truth["double.0"][site[-1]][2], 0.1, g)
        stats.add("safe", site, safe)
    sub = build_subspaces(stats, rank=RANK)
    assert not bool(sub.selected[0, 2])
    assert float(sub.delta[0, 2]) < 0.5


def test_rank_is_validated():
    stats, _ = _stats_with_planted_heads({}, seed=6)
    with pytest.raises(ValueError, match="rank"):
        build_subspaces(stats, rank=0)
    with pytest.raises(ValueError, match="rank"):
        build_subspaces(stats, rank=SHAPE.head_dim + 1)
    few = QKStatistics(SHAPE)
    for block in SHAPE.block_names():
        for site in _sites(block):
            few.add("unsafe", site, torch.randn(1, SHAPE.heads, SHAPE.head_dim))
    with pytest.raises(ValueError, match="fewer than rank"):
        build_subspaces(few, rank=3)  # 2 vectors per (block, q|k)


def test_untrained_pack_from_subspaces_changes_nothing():
    """from_subspaces keeps only selected heads with W = 0, so applying it returns the tokens themselves."""
    planted = {"double.0": [1, 3]}
    stats, _ = _stats_with_planted_heads(planted, seed=7)
    sub = build_subspaces(stats, rank=RANK)
    pack = SafeRoPEPack.from_subspaces(sub, SHAPE, ["concept"])
    assert list(pack.blocks) == ["double.0"]
    assert torch.equal(pack.blocks["double.0"].heads, torch.tensor([False, True, False, True]))
    assert torch.equal(pack.blocks["double.0"].basis_q, sub.bases["double.0"]["q"])
    assert pack.heads_rotated() == 2 and pack.recipe == {"trained": False}
    x = torch.randn(1, SHAPE.heads, 5, SHAPE.head_dim)
    assert pack.rotate(x, "double.0", "q", "txt") is x
    assert "untrained" in pack.describe()


def test_no_selected_head_is_an_error():
    stats, _ = _stats_with_planted_heads({}, seed=8)
    sub = build_subspaces(stats, rank=RANK)
    assert not bool(sub.selected.any())
    with pytest.raises(SafeRoPEPackError, match="no safety-critical head"):
        SafeRoPEPack.from_subspaces(sub, SHAPE, ["concept"])


def test_principal_angle_helper_sees_a_rotation():
    """The angle helper itself: a plane rotated by 10 degrees out of itself shows a 10 degree angle."""
    theta = math.radians(10)
    u1 = torch.eye(4)[:, :2]
    u2 = torch.stack([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, math.cos(theta), math.sin(theta), 0])], 1)
    torch.testing.assert_close(
        _principal_angles_deg(u1, u2).sort().values, torch.tensor([0.0, 10.0], dtype=torch.float64), atol=1e-4, rtol=0
    )
