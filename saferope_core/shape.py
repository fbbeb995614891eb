"""The shape of a FLUX-family transformer, as far as SafeRoPE cares."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MAX_SIZE = 4096  # bound on any block/head count or head_dim read from a file, so a damaged file fails fast

FAMILIES = {
    "flux": "FLUX.1 (dev, schnell, Kontext)",
    "flux2": "FLUX.2",
    "chroma": "Chroma",
    "chroma_radiance": "Chroma Radiance",
    "ovis": "Ovis-Image",
}
"""Architecture families a pack can be built for (id -> name shown to users). FLUX.1 dev, schnell and Kontext share
one architecture, so their packs are interchangeable; the other families are different models."""


def family_name(family: str) -> str:
    return FAMILIES.get(family, family)


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
        return [f"double.{i}" for i in range(self.double_blocks)] + [f"single.{i}" for i in range(self.single_blocks)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelShape:
        sizes = ("double_blocks", "single_blocks", "heads", "head_dim")
        if not isinstance(data, dict) or not isinstance(data.get("family"), str):
            raise ValueError(f"model shape is incomplete or malformed: {data!r}")
        for key in sizes:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
                raise ValueError(
                    f"model shape field '{key}' = {value!r} is impossible: expected an integer in [0, {MAX_SIZE}]"
                )
        shape = cls(data["family"], *(data[key] for key in sizes))
        if min(shape.heads, shape.head_dim) < 1:
            raise ValueError(f"model shape has impossible sizes: {data!r}")
        return shape

    def describe(self) -> str:
        """'FLUX.1 (dev, schnell, Kontext), 19+38 blocks, 24 heads x 128'."""
        return (
            f"{family_name(self.family)}, {self.double_blocks}+{self.single_blocks} blocks, "
            f"{self.heads} heads x {self.head_dim}"
        )

    def mismatch(self, other: ModelShape) -> str | None:
        """Name the first dimension where two shapes differ (both families when those differ), or None."""
        if self.family != other.family:
            return (
                f"family: built for {family_name(self.family)}, but the model is {family_name(other.family)}; "
                "packs do not transfer between model families"
            )
        for field in ("double_blocks", "single_blocks", "heads", "head_dim"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field}: {mine} here, {theirs} in the model ({other.describe()})"
        return None


FLUX_DEV = ModelShape("flux", 19, 38, 24, 128)
