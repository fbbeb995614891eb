"""Cost of SafeRoPE's rotation against the attention matmuls of one FLUX block, as a ratio measured in one run.

    python -m bench.rotation_cost [--tokens 4608] [--heads 24] [--head-dim 128] [--rank 5] [--rotated-heads 24]

Rotation: q and k of every rotated head, all tokens (worst case: the whole joint sequence is risky-scored).
Attention: scaled_dot_product_attention over the same [1, H, L, D] q/k/v (the QK^T and AV matmuls).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from saferope_core.rotation import rotate_tokens


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokens", type=int, default=4608, help="tokens per sequence (FLUX at 1024x1024: 4,096 image + 512 text)"
    )
    p.add_argument("--heads", type=int, default=24, help="heads of the block")
    p.add_argument("--head-dim", type=int, default=128, help="dimension of a head")
    p.add_argument("--rank", type=int, default=5, help="subspace rank")
    p.add_argument("--rotated-heads", type=int, default=24, help="heads the pack rotates")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of q, k and the pack")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, args.heads, args.tokens, args.head_dim, generator=g).to(args.device, dtype) for _ in range(3)
    )
    basis = torch.linalg.qr(torch.randn(args.rotated_heads, args.head_dim, args.rank, generator=g))[0]
    basis = basis.to(args.device)
    w = (0.5 * torch.randn(args.rotated_heads, args.rank, args.rank, generator=g)).to(args.device)
    sel = slice(0, args.rotated_heads)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def attention():
        F.scaled_dot_product_attention(q, k, v)
        sync()

    def rotation():
        rotate_tokens(q[:, sel], basis, w)
        rotate_tokens(k[:, sel], basis, w)
        sync()

    with torch.inference_mode():
        t_attn = best_time(attention, args.repeats)
        t_rot = best_time(rotation, args.repeats)
    per_token_us = t_rot / args.tokens * 1e6
    print(
        f"device {args.device}, {args.dtype}, {args.tokens} tokens, {args.heads} heads x {args.head_dim}, "
        f"rank {args.rank}, {args.rotated_heads} heads rotated (q and k)"
    )
    print(f"attention matmuls of one block: {t_attn * 1e3:.1f} ms")
    print(f"rotation of q and k:            {t_rot * 1e3:.1f} ms ({per_token_us:.2f} us per token)")
    print(f"ratio rotation / attention:     {t_rot / t_attn:.3f}")


if __name__ == "__main__":
    main()
