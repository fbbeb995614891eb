"""The safety pack: every guard of one concept in one file, for one model.

A safety pack holds, for its concept, any of: SafeRoPE's rotations (a SafeRoPEPack), UVR anchors and a prompt
redirector, with the wordings it was built with (the concept's words, and those mined from the text encoder). The
file is one safetensors file: each guard's tensors under its prefix (`rotation/`, `uvr/`, `redirector/`), each
guard's own metadata under `guards`, and one content hash over everything. It is checked as a whole (kind, version,
hash, one model family and shape that every guard agrees with) and each guard by its own validation. A pack saved
with the guard check (saferope_core.guard_check) records which of its guards to apply together (`applies`) and the
check's figures; Apply Safety Pack applies those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import AnchorsError, SafeRoPEError, SafeRoPEPackError
from .files import check_header, hashed, read_safetensors, write_file
from .guard_check import GUARD_NAMES
from .pack import SafeRoPEPack, pack_from_parts
from .redirector import PromptRedirector, RedirectorError
from .shape import ModelShape
from .uvr import UVRAnchors

SAFETY_PACK_KIND = "saferope.safety_pack"
SAFETY_PACK_VERSION = 1
GUARDS = ("rotation", "uvr", "redirector")


class SafetyPackError(SafeRoPEError):
    """A safety pack file is unreadable, damaged or inconsistent, or does not fit the model."""


@dataclass
class SafetyPack:
    shape: ModelShape
    concept: str
    rotation: SafeRoPEPack | None = None
    anchors: UVRAnchors | None = None
    redirector: PromptRedirector | None = None
    redirector_meta: dict = field(default_factory=dict)  # the redirector's recipe and concept, as trained
    wordings: dict[str, list[str]] = field(default_factory=dict)  # "named" (the Prompt Set's), "mined": words
    name: str = "safety pack"
    applies: list[str] | None = None  # the guards to apply together, as the guard check chose; None: all
    guard_check: dict = field(default_factory=dict)  # the check's figures (GuardCheck.to_dict)

    def __post_init__(self):
        problem = self.mismatch()
        if problem:
            raise SafetyPackError(f"{self.name}: {problem}")

    def guards(self) -> list[str]:
        return [g for g, part in zip(GUARDS, (self.rotation, self.anchors, self.redirector), strict=True) if part]

    def applied_guards(self) -> list[str]:
        """The guards Apply Safety Pack applies: those the guard check chose, or all when it was not run."""
        return list(self.applies) if self.applies is not None else self.guards()

    def mismatch(self) -> str | None:
        """Why the guards cannot form one pack (none, or one built for another model), or None."""
        if not self.guards():
            return "it holds no guard (rotations, UVR anchors or a prompt redirector)"
        for guard, part in (("rotations", self.rotation), ("UVR anchors", self.anchors)):
            problem = part and self.shape.mismatch(part.shape)
            if problem:
                return f"its {guard} were built for another model ({problem})"
        if self.redirector is not None and self.redirector.config.family != self.shape.family:
            return f"its prompt redirector was trained on {self.redirector.config.family}, not {self.shape.family}"
        if self.applies is not None and (not self.applies or set(self.applies) - set(self.guards())):
            return f"it applies {self.applies or 'no guard'}, which is not a choice among its guards {self.guards()}"
        return None

    def check_model(self, shape: ModelShape) -> None:
        """SafetyPackError naming the dimension when the pack was built for another model."""
        problem = self.shape.mismatch(shape)
        if problem:
            raise SafetyPackError(f"safety pack '{self.name}' does not fit this model ({problem})")

    def describe(self) -> str:
        """For the node: concept, guards, the model and the wordings it covers."""
        guards = ", ".join(
            {"rotation": "rotations", "uvr": "UVR anchors", "redirector": "prompt redirector"}[g] for g in self.guards()
        )
        lines = [f"{self.concept} | {guards} | for {self.shape.describe()}"]
        if self.applies is not None:
            left_out = [GUARD_NAMES[g] for g in self.guards() if g not in self.applies]
            lines.append(
                "applies: "
                + " + ".join(GUARD_NAMES[g] for g in self.applies)
                + (f" (the guard check left out {', '.join(left_out)})" if left_out else " (as the guard check chose)")
            )
        for kind in ("named", "mined"):
            if self.wordings.get(kind):
                lines.append(f"{kind} wordings: " + ", ".join(self.wordings[kind]))
        return "\n".join(lines)

    # --- the file -----------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        tensors, guards = {}, {}
        if self.rotation is not None:
            part = self.rotation.tensors()
            tensors.update({f"rotation/{k}": v for k, v in part.items()})
            guards["rotation"] = hashed(part, self.rotation.metadata())
        if self.anchors is not None:
            tensors.update({f"uvr/{k}": v for k, v in self.anchors.tensors().items()})
            guards["uvr"] = self.anchors.metadata()
        if self.redirector is not None:
            tensors.update({f"redirector/{k}": v for k, v in self.redirector.tensors().items()})
            meta = self.redirector_meta
            guards["redirector"] = self.redirector.metadata(meta.get("concept", self.concept), meta.get("recipe", {}))
        meta = {
            "kind": SAFETY_PACK_KIND,
            "format_version": SAFETY_PACK_VERSION,
            "model": self.shape.to_dict(),
            "concept": self.concept,
            "guards": guards,
            "wordings": self.wordings,
        }
        if self.applies is not None:
            meta.update(applies=list(self.applies), guard_check=self.guard_check)
        return write_file(path, tensors, meta)


def load_safety_pack(path) -> SafetyPack:
    """Read and validate a safety pack file; SafetyPackError saying what is wrong."""
    path = Path(path)
    tensors, meta = read_safetensors(path, SafetyPackError)
    return safety_pack_from_parts(tensors, meta, path.name)


def safety_pack_from_parts(tensors: dict, meta: dict, name: str) -> SafetyPack:
    def fail(problem: str):
        raise SafetyPackError(f"{name}: {problem}")

    check_header(tensors, meta, name, SAFETY_PACK_KIND, SAFETY_PACK_VERSION, "safety pack", SafetyPackError)
    try:
        shape = ModelShape.from_dict(meta.get("model"))
    except ValueError as err:
        fail(str(err))
    guards, wordings = meta.get("guards"), meta.get("wordings", {})
    if not isinstance(guards, dict) or set(guards) - set(GUARDS) or not isinstance(meta.get("concept"), str):
        fail(f"malformed metadata: 'guards' must hold some of {', '.join(GUARDS)}, 'concept' a name")
    if not isinstance(wordings, dict) or not all(
        isinstance(words, list) and all(isinstance(w, str) for w in words) for words in wordings.values()
    ):
        fail("malformed metadata: 'wordings' must map kinds to lists of words")
    applies = meta.get("applies")
    if applies is not None and not (isinstance(applies, list) and all(isinstance(g, str) for g in applies)):
        fail("malformed metadata: 'applies' must list guards")
    if not isinstance(meta.get("guard_check", {}), dict):
        fail("malformed metadata: 'guard_check' must be a mapping")
    unknown = {k for k in tensors if k.split("/", 1)[0] not in guards}
    if unknown:
        fail(f"tensors of no guard: {sorted(unknown)[:3]}")

    def part(guard: str) -> dict:
        return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(guard + "/")}

    parts = {}
    try:
        if "rotation" in guards:
            parts["rotation"] = pack_from_parts(part("rotation"), guards["rotation"], f"{name} (rotations)")
        if "uvr" in guards:
            parts["anchors"] = UVRAnchors.from_parts(part("uvr"), guards["uvr"], f"{name} (UVR anchors)")
        if "redirector" in guards:
            redirector, redirector_meta = PromptRedirector.from_parts(
                part("redirector"), guards["redirector"], f"{name} (prompt redirector)"
            )
            parts.update(redirector=redirector, redirector_meta=redirector_meta)
    except (SafeRoPEPackError, AnchorsError, RedirectorError) as err:
        raise SafetyPackError(str(err)) from None
    return SafetyPack(
        shape,
        meta["concept"],
        wordings=wordings,
        name=name,
        applies=applies,
        guard_check=meta.get("guard_check", {}),
        **parts,
    )
