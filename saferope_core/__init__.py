"""SafeRoPE: subspaces, risk scores, head selection, risk-aware rotations and the pack file. No ComfyUI here."""

from .errors import (
    AnchorsError,
    CheckpointError,
    PromptAlignmentError,
    PromptSetError,
    RedirectorError,
    SafeRoPEError,
    SafeRoPEPackError,
    StatisticsError,
)
from .objective import (
    TrainingRecipe,
    batch_kind,
    deviation,
    learning_rate_at,
    noised_latent,
    one_step_clean,
    preserve_loss,
    redirect_gap,
    redirect_loss,
    relative_deviation,
    unlearn_loss,
)
from .pack import BlockRotation, SafeRoPEPack, load_pack
from .prompts import PromptSet, UnsafePrompt, build_unsafe_prompts, clean_lines, locate_subjects
from .rotation import latent_risk_score, rotate_tokens, skew
from .shape import FLUX_DEV, ModelShape
from .statistics import QKStatistics, site_name
from .subspaces import Subspaces, build_subspaces, subspace_basis

__all__ = [
    "AnchorsError",
    "CheckpointError",
    "PromptAlignmentError",
    "PromptSetError",
    "RedirectorError",
    "SafeRoPEError",
    "StatisticsError",
    "FLUX_DEV",
    "learning_rate_at",
    "BlockRotation",
    "ModelShape",
    "PromptSet",
    "QKStatistics",
    "SafeRoPEPack",
    "SafeRoPEPackError",
    "Subspaces",
    "TrainingRecipe",
    "UnsafePrompt",
    "batch_kind",
    "build_subspaces",
    "build_unsafe_prompts",
    "clean_lines",
    "deviation",
    "noised_latent",
    "one_step_clean",
    "latent_risk_score",
    "load_pack",
    "locate_subjects",
    "preserve_loss",
    "redirect_gap",
    "redirect_loss",
    "relative_deviation",
    "rotate_tokens",
    "site_name",
    "skew",
    "subspace_basis",
    "unlearn_loss",
]
