"""The shape of a FLUX-family transformer, as far as SafeRoPE cares."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    """Block and head counts of an MMDiT model (FLUX: 19 double + 38 single blocks, 24 heads x 128)."""

    family: str
    double_blocks: int
    single_blocks: int
    heads: int
    head_dim: int

    def block_names(self) -> list[str]:
        """All attention blocks in execution order: 'double.0' ... 'single.N'."""
        return [f"double.{i}" for i in range(self.double_blocks)] + [
            f"single.{i}" for i in range(self.single_blocks)
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelShape:
        try:
            shape = cls(
                family=str(data["family"]),
                double_blocks=int(data["double_blocks"]),
                single_blocks=int(data["single_blocks"]),
                heads=int(data["heads"]),
                head_dim=int(data["head_dim"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"model shape is incomplete or malformed ({err!r}): {data!r}") from None
        if min(shape.heads, shape.head_dim) < 1 or min(shape.double_blocks, shape.single_blocks) < 0:
            raise ValueError(f"model shape has impossible sizes: {data!r}")
        return shape

    def mismatch(self, other: ModelShape) -> str | None:
        """Name the first dimension where two shapes differ, or None when they match."""
        for field in ("family", "double_blocks", "single_blocks", "heads", "head_dim"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field}: {mine} here, {theirs} in the model"
        return None


FLUX_DEV = ModelShape("flux", 19, 38, 24, 128)
