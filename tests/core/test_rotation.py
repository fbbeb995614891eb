"""Risk-aware rotation: orthogonality, exact identities, agreement with matrix_exp, gradients, gate, dtypes."""

import math

import pytest
import torch

from saferope_core import latent_risk_score, rotate_tokens, skew
from saferope_core.rotation import _RotateCoefficients, skew_eigen

B, H, L, D = 2, 3, 5, 12


def _data(rank: int, seed: int = 0, w_scale: float = 2.0, dtype=torch.float32):
    """Random tokens x [B, H, L, D], orthonormal bases U [H, D, r] and parameters W [H, r, r]."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, D, rank, generator=g, dtype=torch.float64))[0]
    # tokens with a sizeable share of their energy in the subspace, so LRS is far from 0
    inside = torch.einsum("hdr,bhlr->bhld", basis, 2 * torch.randn(B, H, L, rank, generator=g, dtype=torch.float64))
    x = inside + torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    w = w_scale * torch.randn(H, rank, rank, generator=g, dtype=torch.float64)
    return x.to(dtype), basis.to(dtype), w.to(dtype)


def _reference(x, basis, w, strength=1.0, gate=None):
    """x + U (matrix_exp(t A) - I) U^T x per token, in float64, with t = strength * LRS (gated)."""
    x, basis, w = x.double(), basis.double(), w.double()
    c = torch.einsum("bhld,hdr->bhlr", x, basis)
    lrs = c.square().sum(-1) / x.square().sum(-1)
    t = strength * lrs
    if gate is not None:
        t = t * (lrs > gate)
    a = skew(w)
    rot = torch.linalg.matrix_exp(t[..., None, None] * a[None, :, None])  # [B, H, L, r, r]
    dc = torch.einsum("bhlij,bhlj->bhli", rot, c) - c
    return x + torch.einsum("bhlr,hdr->bhld", dc, basis)


def test_latent_risk_score_is_projected_energy_share():
    """LRS = ||U^T x||^2 / ||x||^2 lies in [0, 1]; 1 inside the subspace, 0 orthogonal to it."""
    x, basis, _ = _data(rank=3)
    lrs = latent_risk_score(x, basis)
    assert lrs.shape == (B, H, L)
    assert bool((lrs >= 0).all()) and bool((lrs <= 1 + 1e-6).all())
    projected = torch.einsum("hdr,bhlr->bhld", basis, torch.einsum("bhld,hdr->bhlr", x, basis))
    torch.testing.assert_close(lrs, projected.square().sum(-1) / x.square().sum(-1))
    assert torch.allclose(latent_risk_score(projected, basis), torch.ones(B, H, L), atol=1e-5)
    assert torch.allclose(latent_risk_score(x - projected, basis), torch.zeros(B, H, L), atol=1e-5)


def test_skew_is_antisymmetric():
    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    a = skew(w)
    assert torch.equal(a, -a.transpose(-1, -2))
    assert torch.equal(a, w - w.transpose(-1, -2))


@pytest.mark.parametrize("rank", [2, 3, 5, 8])
def test_rotation_preserves_norms(rank):
    """The map is orthogonal: every token keeps its norm (fp32, 1e-5) while it really moves."""
    x, basis, w = _data(rank, seed=rank)
    out = rotate_tokens(x, basis, w)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert (out - x).norm(dim=-1).median() > 0.1  # a non-trivial rotation


def test_rotation_moves_only_the_subspace_component():
    """x' - x lies in span(U): the orthogonal complement (I - P) x is unchanged."""
    x, basis, w = _data(rank=5, seed=3)
    out = rotate_tokens(x, basis, w)
    change = out - x
    in_span = torch.einsum("hdr,bhlr->bhld", basis, torch.einsum("bhld,hdr->bhlr", change, basis))
    torch.testing.assert_close(change, in_span, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [2, 3, 5, 8])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_rotate_tokens_matches_matrix_exp_per_token(rank, strength):
    """The eigenbasis fast path equals U (matrix_exp(s LRS A) - I) U^T x + x token by token."""
    x, basis, w = _data(rank, seed=10 + rank)
    out = rotate_tokens(x, basis, w, strength=strength)
    expected = _reference(x, basis, w, strength)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [2, 3, 5, 8])
def test_rotate_coefficients_matches_matrix_exp_float64(rank):
    """_RotateCoefficients computes (exp(t A) - I) c; in float64 it agrees with matrix_exp to 1e-12."""
    g = torch.Generator().manual_seed(rank)
    a = skew(3 * torch.randn(H, rank, rank, generator=g, dtype=torch.float64))
    t = torch.rand(B, H, L, generator=g, dtype=torch.float64)
    c = torch.randn(B, H, L, rank, generator=g, dtype=torch.float64)
    dc = _RotateCoefficients.apply(a, t, c, *skew_eigen(a))
    rot = torch.linalg.matrix_exp(t[..., None, None] * a[None, :, None])
    expected = torch.einsum("bhlij,bhlj->bhli", rot, c) - c
    torch.testing.assert_close(dc, expected, atol=1e-12, rtol=1e-10)


def test_identity_when_strength_is_zero():
    """s = 0 returns x itself, no copy."""
    x, basis, w = _data(rank=3)
    assert rotate_tokens(x, basis, w, strength=0.0) is x
    assert rotate_tokens(x, basis, w, strength=0) is x


def test_identity_when_a_is_zero():
    """A = W - W^T = 0 (W = 0 or symmetric W) returns x itself; a trainable W = 0 gives equal values."""
    x, basis, w = _data(rank=3)
    assert rotate_tokens(x, basis, torch.zeros_like(w)) is x
    assert rotate_tokens(x, basis, w + w.transpose(-1, -2)) is x
    trainable = torch.zeros_like(w, requires_grad=True)
    out = rotate_tokens(x, basis, trainable)
    assert torch.equal(out, x)


def test_identity_when_lrs_is_zero():
    """Tokens orthogonal to the subspace (LRS = 0) come back with bit-identical values, for any W."""
    rank = 3
    _, _, w = _data(rank, seed=5)
    basis = torch.eye(D)[:, :rank].expand(H, D, rank).contiguous()  # U = first r coordinate axes
    x = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(6))
    x[..., :rank] = 0
    assert torch.equal(latent_risk_score(x, basis), torch.zeros(B, H, L))
    assert torch.equal(rotate_tokens(x, basis, w), x)
    assert torch.equal(rotate_tokens(x, basis, w.clone().requires_grad_()), x)


def test_hard_gate_leaves_low_risk_tokens_untouched():
    """With a gate, tokens with LRS <= gate are bit-identical and the others are rotated as without a gate."""
    rank, gate = 3, 0.5
    _, _, w = _data(rank, seed=7)
    basis = torch.eye(D)[:, :rank].expand(H, D, rank).contiguous()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, H, L, D, generator=g)
    # set each token's LRS exactly: odd positions 0.9, even positions 0.2
    target = torch.tensor([0.2, 0.9] * L)[:L].expand(B, H, L)
    inside = x[..., :rank] / x[..., :rank].norm(dim=-1, keepdim=True)
    outside = x[..., rank:] / x[..., rank:].norm(dim=-1, keepdim=True)
    x = torch.cat([inside * target.sqrt()[..., None], outside * (1 - target).sqrt()[..., None]], -1)
    lrs = latent_risk_score(x, basis)
    low = lrs <= gate
    assert bool(low.any()) and bool((~low).any())

    out = rotate_tokens(x, basis, w, gate=gate)
    assert torch.equal(out[low], x[low])
    ungated = rotate_tokens(x, basis, w)
    assert torch.equal(out[~low], ungated[~low])
    assert (out[~low] - x[~low]).norm(dim=-1).min() > 1e-2
    torch.testing.assert_close(out.double(), _reference(x, basis, w, gate=gate), atol=1e-5, rtol=1e-5)


def test_hard_gate_boundary_is_not_rotated():
    """A token whose LRS equals the gate exactly is left alone (the gate is LRS > gate)."""
    x, basis, w = _data(rank=3, seed=9)
    lrs = latent_risk_score(x, basis)
    gate = float(lrs[0, 0, 0])
    out = rotate_tokens(x, basis, w, gate=gate)
    assert torch.equal(out[0, 0, 0], x[0, 0, 0])
    assert not torch.equal(out[lrs > gate], x[lrs > gate])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtype_is_preserved(dtype):
    """fp16 / bf16 in -> same dtype out, equal to the fp32 computation rounded to that dtype."""
    x, basis, w = _data(rank=5, seed=11)
    x_low = x.to(dtype)
    out = rotate_tokens(x_low, basis, w)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, rotate_tokens(x_low.float(), basis, w).to(dtype))
    assert not torch.equal(out, x_low)


def _loss_weights(seed=12):
    return torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("start", ["zero", "tiny", "random"])
def test_gradient_reaches_w(start):
    """d loss / d W is finite, non-zero and equals autograd through matrix_exp: from W = 0, from a tiny W
    (nearly coincident eigenvalues, where divided differences cancel) and from a random W."""
    rank = 5
    x, basis, w = _data(rank, seed=13)
    w = {"zero": 0.0, "tiny": 1e-5, "random": 1.0}[start] * w
    weights = _loss_weights()

    w_fast = w.clone().requires_grad_()
    (rotate_tokens(x, basis, w_fast).double() * weights).sum().backward()
    w_ref = w.double().clone().requires_grad_()
    (_reference(x, basis, w_ref) * weights).sum().backward()

    grad = w_fast.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    assert grad.abs().max() > 1e-3
    scale = float(w_ref.grad.abs().max())
    torch.testing.assert_close(grad.double(), w_ref.grad, atol=1e-4 * scale, rtol=0)


def test_zero_tokens_stay_zero_with_finite_gradients():
    """All-zero tokens (e.g. padding) have LRS 0: they stay zero and give finite gradients to W and x."""
    x, basis, w = _data(rank=3, seed=15)
    x[:, :, :2] = 0
    x.requires_grad_()
    w = w.clone().requires_grad_()
    out = rotate_tokens(x, basis, w)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    (out.double() * _loss_weights()).sum().backward()
    assert bool(torch.isfinite(w.grad).all()) and bool(torch.isfinite(x.grad).all())


def test_gradient_flows_through_gate():
    """With a gate, W still gets a gradient from the gated-in tokens."""
    x, basis, w = _data(rank=3, seed=14)
    w = torch.zeros_like(w, requires_grad=True)
    (rotate_tokens(x, basis, w, gate=0.3).double() * _loss_weights()).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().max() > 1e-3


def _rotate64(x, basis, w):
    """The full rotation in float64, built from the same autograd Function rotate_tokens uses."""
    c = torch.einsum("bhld,hdr->bhlr", x, basis)
    t = c.square().sum(-1) / x.square().sum(-1)
    a = skew(w)
    return x + torch.einsum("bhlr,hdr->bhld", _RotateCoefficients.apply(a, t, c, *skew_eigen(a.detach())), basis)


@pytest.mark.parametrize("rank", [2, 3, 5])
@pytest.mark.parametrize("start", ["zero", "random"])
def test_gradcheck_through_w_float64(rank, start):
    """torch.autograd.gradcheck of the rotation w.r.t. W (A = W - W^T), also at W = 0 (repeated eigenvalues)."""
    x, basis, w = _data(rank, seed=20 + rank, dtype=torch.float64)
    x = x[:1, :2, :3]
    basis = basis[:2]
    w = (w[:2] if start == "random" else torch.zeros_like(w[:2])).requires_grad_()
    assert torch.autograd.gradcheck(lambda w_: _rotate64(x, basis, w_), (w,), eps=1e-6, atol=1e-7)


def test_gradcheck_through_tokens_float64():
    """The custom backward is also right for the tokens (through both the coefficients and the LRS)."""
    x, basis, w = _data(rank=3, seed=30, dtype=torch.float64)
    x = x[:1, :2, :3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: _rotate64(x_, basis[:2], w[:2]), (x,), eps=1e-6, atol=1e-7)


def test_rotation_angle_scales_with_strength():
    """exp(s t A): doubling the strength doubles the rotation generator (two half steps make one full step)."""
    x, basis, w = _data(rank=2, seed=31, w_scale=0.3)
    basis2 = torch.eye(D)[:, :2].expand(H, D, 2).contiguous()
    x = torch.zeros(B, H, L, D)
    x[..., 0] = 1.0  # LRS = 1 and stays 1 under rotations inside the plane
    once = rotate_tokens(x, basis2, w, strength=2.0)
    twice = rotate_tokens(rotate_tokens(x, basis2, w, strength=1.0), basis2, w, strength=1.0)
    torch.testing.assert_close(once, twice, atol=1e-6, rtol=1e-6)
    angle = torch.atan2(once[..., 1], once[..., 0])
    a01 = skew(w)[:, 1, 0]  # exp(2A) e0 = (cos 2a, sin 2a) with a = A[1, 0]
    expected = torch.remainder(2 * a01 + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(angle, expected[None, :, None].expand(B, H, L), atol=1e-5, rtol=0)
