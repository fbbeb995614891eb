"""One exception type per kind of failure, raised where the failure is known and caught by type.

All are ValueErrors whose message says what is wrong (and names the file, for files). Anything else that goes
wrong is a bug and keeps its own type.
"""


class SafeRoPEError(ValueError):
    """Base of the pack's own failures."""


class SafeRoPEPackError(SafeRoPEError):
    """A pack file is unreadable or inconsistent, or a pack does not fit the model it is applied to."""


class StatisticsError(SafeRoPEError):
    """Statistics are unreadable or inconsistent, come from different models, or hold too few vectors."""


class AnchorsError(SafeRoPEError):
    """UVR anchors are unreadable or inconsistent, or too few vectors were collected to make them."""


class CheckpointError(SafeRoPEError):
    """A training checkpoint is unreadable or belongs to another training run."""


class PromptSetError(SafeRoPEError):
    """Prompt lists or a prompt file cannot make a prompt set."""


class RedirectorError(SafeRoPEError):
    """A prompt redirector file is unreadable, damaged or made for another model."""


class PromptAlignmentError(SafeRoPEError):
    """The text encoder's tokens cannot be matched with the conditioning the model receives (a text encoder made
    for another model)."""
