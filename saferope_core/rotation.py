"""Risk-aware rotation inside a head's unsafe subspace (SafeRoPE eq. 7).

x' = x + U (exp(t A) - I) U^T x  with  t = strength * LRS(x) (optionally gated),  A = W - W^T.

exp(t A) is never formed per token. A skew-symmetric A is normal: i*A is Hermitian, so one `eigh` per head
gives A = V diag(mu) V^H with purely imaginary mu = -i*lambda. A token then costs a projection onto U, a change
to the eigenbasis, one phase per eigen-pair (r/2 planar rotations written as complex phases) and the way back.
The backward pass is written out (Daleckii-Krein divided differences), so it stays finite when eigenvalues
coincide, e.g. at A = 0 where training starts.
"""

from __future__ import annotations

import torch


def skew(w: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric matrix A = W - W^T of a (batched) square parameter W."""
    return w - w.transpose(-1, -2)


def _project(x32: torch.Tensor, basis32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients U^T x [B, H, L, r] and LRS = ||U^T x||^2 / ||x||^2 [B, H, L] of float32 tokens."""
    coeff = torch.einsum("bhld,hdr->bhlr", x32, basis32)
    return coeff, coeff.square().sum(-1) / x32.square().sum(-1).clamp_min(1e-12)


def latent_risk_score(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """LRS = ||U^T x||^2 / ||x||^2 for x [B, H, L, D] and per-head bases U [H, D, r] -> [B, H, L] in [0, 1]."""
    return _project(x.float(), basis.float())[1]


def skew_eigen(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition A = V diag(-i*lam) V^H of skew A [H, r, r]; returns (lam [H, r] real, V complex).
    A host-device sync on a GPU: work it out once per fixed W (`BlockRotation.eigen`), not per model call."""
    complex_dtype = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    lam, vec = torch.linalg.eigh(1j * a.to(complex_dtype))
    return lam, vec


def _phase_minus_one(phi: torch.Tensor) -> torch.Tensor:
    """exp(-i*phi) - 1, exact zero at phi = 0 (so LRS = 0 or A = 0 leaves tokens bit-identical)."""
    return torch.complex(-2.0 * torch.sin(phi / 2).square(), -torch.sin(phi))


class _RotateCoefficients(torch.autograd.Function):
    """dc = (exp(t A) - I) c for per-head A [H, r, r] with its eigen-decomposition (lam, vec) (`skew_eigen`),
    per-token t [B, H, L], coefficients c [B, H, L, r]."""

    @staticmethod
    def forward(ctx, a, t, c, lam, vec):
        with torch.no_grad():
            z = torch.einsum("hsr,bhls->bhlr", vec.conj(), c.to(vec.dtype))  # V^H c
            phi = t.unsqueeze(-1) * lam[:, None, :]  # [B, H, L, r]
            dc = torch.einsum("hsr,bhlr->bhls", vec, _phase_minus_one(phi) * z).real.to(c.dtype)
        ctx.save_for_backward(a, t, c, dc, lam, vec)
        return dc

    @staticmethod
    def backward(ctx, grad):
        a, t, c, dc, lam, vec = ctx.saved_tensors
        grad_a = grad_t = grad_c = None
        gz = torch.einsum("hsr,bhls->bhlr", vec.conj(), grad.to(vec.dtype))  # V^H g
        phi = t.unsqueeze(-1) * lam[:, None, :]
        if ctx.needs_input_grad[2]:  # (exp(tA)^T - I) g = (exp(-tA) - I) g
            grad_c = torch.einsum("hsr,bhlr->bhls", vec, _phase_minus_one(-phi) * gz).real.to(c.dtype)
        if ctx.needs_input_grad[1]:  # g . A exp(tA) c
            grad_t = (grad * torch.einsum("hij,bhlj->bhli", a, c + dc)).sum(-1)
        if ctx.needs_input_grad[0]:
            grad_a = _exp_frechet_adjoint(t, c, gz, lam, vec).to(a.dtype)
        return grad_a, grad_t, grad_c, None, None


def _exp_frechet_adjoint(t, c, gz, lam, vec):
    """sum over tokens of t * L_exp(tA)^*[g c^T], in the eigenbasis with divided differences of exp."""
    x = -1j * t.unsqueeze(-1) * lam[:, None, :]  # eigenvalues of tA, [B, H, L, r]
    ex = torch.exp(x)
    diff = x.unsqueeze(-1) - x.unsqueeze(-2)
    close = diff.abs() < 1e-6
    safe_diff = torch.where(close, torch.ones_like(diff), diff)
    divided = torch.where(
        close, (ex.unsqueeze(-1) + ex.unsqueeze(-2)) / 2, (ex.unsqueeze(-1) - ex.unsqueeze(-2)) / safe_diff
    )
    cz = torch.einsum("hsj,bhls->bhlj", vec, c.to(vec.dtype))  # V^T c
    inner = torch.einsum("bhl,bhlij,bhli,bhlj->hij", t.to(vec.dtype), divided.conj(), gz, cz)
    return torch.einsum("hir,hrs,hjs->hij", vec, inner, vec.conj()).real


def rotates(w: torch.Tensor) -> bool:
    """Whether W turns anything: its skew part is not zero (or it is being trained). A host sync on a GPU W: call
    it once per pack, not per model call."""
    return w.requires_grad or bool(torch.any(w != w.transpose(-1, -2)))


def rotate_tokens(
    x: torch.Tensor,
    basis: torch.Tensor,
    w: torch.Tensor,
    strength: float = 1.0,
    gate: float | None = None,
    known_to_rotate: bool = False,
    eigen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotate tokens x [B, H, L, D] of H heads inside their subspaces U [H, D, r] by exp(s*LRS*(W - W^T)).

    Computes in float32 and returns x's dtype. `gate`: tokens with LRS at or below it are not rotated.
    Returns x itself (no copy) when nothing can rotate, so a zero pack is bit-exact; `known_to_rotate` skips that
    check (a host-device sync) when the caller has made it once already (see `rotates`). `eigen`: `skew_eigen` of
    the float32 W - W^T on x's device, worked out beforehand for a W that does not change (else it is worked out
    here: a sync on a GPU).
    """
    if strength == 0 or not (known_to_rotate or rotates(w)):
        return x
    x32 = x.float()
    u = basis.to(device=x.device, dtype=torch.float32)
    coeff, lrs = _project(x32, u)
    t = strength * lrs
    if gate is not None:
        t = t * (lrs > gate)
    a = skew(w.to(device=x.device, dtype=torch.float32))
    lam, vec = eigen if eigen is not None else skew_eigen(a.detach())
    dc = _RotateCoefficients.apply(a, t, coeff, lam, vec)
    return (x32 + torch.einsum("bhlr,hdr->bhld", dc, u)).to(x.dtype)
