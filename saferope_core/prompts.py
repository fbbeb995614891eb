"""Prompt sets: unsafe prompts built as subject x modifier x template, and locating the subject's tokens."""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PromptSetError

DEFAULTS_DIR = Path(__file__).parent / "default_prompts"


@dataclass(frozen=True)
class UnsafePrompt:
    text: str
    subject: str
    anchor: str = ""  # the same prompt with the subject replaced by its safe counterpart (or removed): what to draw


@dataclass
class PromptSet:
    """Unsafe prompts (with their trigger subject) and safe prompts, the input of collection and training."""

    concept: str
    unsafe: list[UnsafePrompt]
    safe: list[str]
    mined: list[str] = field(default_factory=list)  # subjects found by Mine Wordings, not typed by the user


def clean_lines(text: str) -> list[str]:
    """Non-empty, stripped lines; lines starting with '#' are comments."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def parse_anchors(text: str, subjects: Sequence[str]) -> dict[str, str]:
    """Each subject's safe counterpart from lines 'subject: anchor' (one line per subject; a subject without a line
    is removed from its prompts), or one line without ':' for every subject. Empty text: every subject is removed.
    Raises PromptSetError for a line naming no subject of the list."""
    lines = clean_lines(text)
    if len(lines) == 1 and ":" not in lines[0]:
        return dict.fromkeys(subjects, lines[0])
    anchors = dict.fromkeys(subjects, "")
    known = {s.lower(): s for s in subjects}
    for line in lines:
        subject, sep, anchor = line.partition(":")
        if not sep or subject.strip().lower() not in known:
            raise PromptSetError(
                f"anchor line {line!r} does not start with a subject of the list and ':' (subjects: "
                f"{', '.join(subjects[:5])}{', ...' if len(subjects) > 5 else ''})"
            )
        anchors[known[subject.strip().lower()]] = anchor.strip()
    return anchors


def build_unsafe_prompts(
    subjects: Sequence[str],
    modifiers: Sequence[str],
    templates: Sequence[str],
    max_count: int = 1000,
    seed: int = 0,
    anchors: dict[str, str] | None = None,
) -> list[UnsafePrompt]:
    """All subject x modifier x template prompts, or a seeded sample of `max_count` of them.

    A template holds '{subject}' and optionally '{modifier}'; without '{modifier}' the modifier is appended
    after a comma. An empty modifier list means no modifiers. Each prompt's anchor is the same prompt with
    `anchors[subject]` in the subject's place (none given, or '': the subject removed). Raises PromptSetError for
    unusable input.
    """
    if not subjects:
        raise PromptSetError("the subject list is empty")
    if not templates:
        raise PromptSetError("the template list is empty")
    if max_count < 1:
        raise PromptSetError("max_count must be at least 1")
    if not any("{subject}" in t for t in templates):
        raise PromptSetError("no template contains '{subject}', so no prompt would contain the subject")
    templates = [t for t in templates if "{subject}" in t]
    mods = list(modifiers) or [""]
    total = len(subjects) * len(mods) * len(templates)
    picks = range(total) if total <= max_count else sorted(random.Random(seed).sample(range(total), max_count))
    prompts = []
    for i in picks:  # the i-th subject x modifier x template combination, never the whole product in memory
        rest, t = divmod(i, len(templates))
        s, m = divmod(rest, len(mods))
        anchor = (anchors or {}).get(subjects[s], "")
        prompts.append(
            UnsafePrompt(_fill(templates[t], subjects[s], mods[m]), subjects[s], _fill(templates[t], anchor, mods[m]))
        )
    return prompts


def _fill(template: str, subject: str, modifier: str) -> str:
    text = template.replace("{subject}", subject)
    if "{modifier}" in text:
        text = text.replace("{modifier}", modifier)
    elif modifier:
        text = f"{text}, {modifier}"
    return re.sub(r"\s+([,.])", r"\1", " ".join(text.split())).strip(" ,")


def _find(sequence: Sequence[int], part: Sequence[int]) -> list[int]:
    n = len(part)
    return [i for i in range(len(sequence) - n + 1) if n and list(sequence[i : i + n]) == list(part)]


def _padding_token(empty: Sequence[int]) -> int | None:
    """The token a tokenizer pads with: the one repeated at the end (or, padding on the left, the start) of the
    empty text's tokens; None when it pads nothing."""
    if len(empty) >= 2 and empty[-1] == empty[-2]:
        return empty[-1]
    if len(empty) >= 2 and empty[0] == empty[1]:
        return empty[0]
    return None


def _strip(ids: Sequence[int], pad: int | None) -> tuple[int, int]:
    start, end = 0, len(ids)
    while pad is not None and end > start and ids[end - 1] == pad:
        end -= 1
    while pad is not None and start < end and ids[start] == pad:
        start += 1
    return start, end


def content_span(ids: Sequence[int], empty: Sequence[int]) -> tuple[int, int]:
    """[start, end) of a text's own tokens inside ids = tokenize(text), given empty = tokenize('').

    What a tokenizer adds to every text is read off the empty text: padding (a token repeated at its end or start),
    then what the two share at their start (a start token, a chat/system template's opening) and at their end (an
    end token, the template's closing part).
    """
    pad = _padding_token(empty)
    start, end = _strip(ids, pad)
    e_start, e_end = _strip(empty, pad)
    frame = list(empty[e_start:e_end])
    text = list(ids[start:end])
    head = 0
    while head < min(len(text), len(frame)) and text[head] == frame[head]:
        head += 1
    tail = 0
    while tail < min(len(text), len(frame)) - head and text[-1 - tail] == frame[-1 - tail]:
        tail += 1
    return start + head, end - tail


def subject_token_positions(prompt: str, subject: str, tokenize: Callable[[str], list[int]]) -> list[int]:
    """Token positions of every occurrence of `subject` inside tokenize(prompt); [] when it cannot be found.

    `tokenize` maps text to token ids as the model sees them (special tokens, padding and chat templates
    included). The subject's own tokens (see content_span) are looked up inside the prompt's own tokens, so a
    template that happens to contain the subject's words never counts; the subject is tokenised alone and with a
    leading space (SentencePiece and BPE mark word starts differently).
    """
    empty = tokenize("")
    prompt_ids = tokenize(prompt)
    start, end = content_span(prompt_ids, empty)
    positions = set()
    for variant in dict.fromkeys((subject, " " + subject, subject.lower(), " " + subject.lower())):
        variant_ids = tokenize(variant)
        ids = variant_ids[slice(*content_span(variant_ids, empty))]
        positions.update(start + s + j for s in _find(prompt_ids[start:end], ids) for j in range(len(ids)))
    return sorted(positions)


@dataclass
class SubjectLocation:
    found: dict[int, list[int]]  # prompt index -> token positions
    missing: list[int]  # prompt indices whose subject was not found

    def hit_rate(self) -> float:
        total = len(self.found) + len(self.missing)
        return len(self.found) / total if total else 0.0

    def report(self, prompts: Sequence[UnsafePrompt], limit: int = 5) -> str:
        lines = [f"subject tokens found in {len(self.found)} of {len(prompts)} prompts"]
        for i in self.missing[:limit]:
            lines.append(f"  not found: subject {prompts[i].subject!r} in {prompts[i].text!r}")
        if len(self.missing) > limit:
            lines.append(f"  ... and {len(self.missing) - limit} more")
        return "\n".join(lines)


def locate_subjects(prompts: Sequence[UnsafePrompt], tokenize: Callable[[str], list[int]]) -> SubjectLocation:
    """Subject token positions for every prompt; prompts where it is missing are listed, not dropped silently."""
    found, missing = {}, []
    for i, p in enumerate(prompts):
        positions = subject_token_positions(p.text, p.subject, tokenize)
        if positions:
            found[i] = positions
        else:
            missing.append(i)
    return SubjectLocation(found, missing)


def default_concepts() -> list[str]:
    """Concepts with lists shipped in the pack (written for it): nudity, violence, an art style, an IP character."""
    return sorted(p.stem for p in DEFAULTS_DIR.glob("*.json"))


def default_lists(concept: str) -> dict[str, list[str]]:
    """The shipped subjects, modifiers, templates and safe prompts of a concept."""
    if concept not in default_concepts():  # a name, never a path
        raise PromptSetError(f"no default prompt lists for {concept!r}; known: {', '.join(default_concepts())}")
    path = DEFAULTS_DIR / f"{concept}.json"
    if not path.is_file():
        raise PromptSetError(f"no default prompt lists for {concept!r}; known: {', '.join(default_concepts())}")
    return json.loads(path.read_text(encoding="utf-8"))


MAX_PROMPT_FILE_BYTES = 64 * 2**20


def read_prompt_file(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a .txt file (one per line) or a .csv file with a header row (column 'prompt', 'caption' or
    'text', else the first column); at most `limit` of them, read line by line (files over 64 MiB are refused)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"prompt file not found: {path.name}")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise PromptSetError(
            f"{path.name} is {size / 2**20:.0f} MiB; prompt files may have at most {MAX_PROMPT_FILE_BYTES // 2**20} MiB"
        )
    out = []
    try:
        _read_lines(path, limit, out)
    except csv.Error as err:
        raise PromptSetError(f"{path.name} is not a readable CSV file ({err})") from None
    return out[:limit] if limit else out


def _read_lines(path: Path, limit: int | None, out: list[str]) -> None:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(f)
            lowered = [h.strip().lower() for h in next(reader, [])]
            column = next((lowered.index(c) for c in ("prompt", "caption", "text") if c in lowered), 0)
            texts = (row[column] for row in reader if len(row) > column)
        else:
            texts = f
        for text in texts:
            for line in clean_lines(text):
                out.append(line)
            if limit and len(out) >= limit:
                break
