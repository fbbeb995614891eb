"""Wordings that draw a concept without naming it, mined from the text encoder's own vocabulary.

A guard trained only on the words a user typed can miss the words they did not think of. Mining finds them in three
narrowing steps, each cheap enough for the next:
1. `vocabulary_words`: the whole words of the tokenizer's vocabulary (no sub-word pieces, special tokens, numbers);
2. `nearest`: those whose token embeddings (the encoder's input table) lie nearest the concept's subjects, then,
   among them, those whose encoded token, written into one of the concept's prompts, lies nearest the subject's;
3. `draws_the_concept`: kept only when the model itself moves the prompt towards the concept: its velocity is
   nearer the prompt with the concept's word than the prompt with the safe counterpart, and nearer than the prompt
   with any of the safe words nearest the concept (words of the Prompt Set's safe prompts: "purple" is safe when
   blue is erased, so "violet", which the model draws purple, is not mined for blue).
Words of the safe prompts are never mined themselves: the user said they are safe.
The mined words become subjects of more unsafe prompts (`with_wordings`), so every guard is trained on them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

import torch

from .prompts import PromptSet, UnsafePrompt

WORD = re.compile(r"^[a-z][a-z-]{2,24}$")


WORD_STARTS = ("\u2581", "\u0120")  # SentencePiece's and byte-level BPE's marks of a piece that starts a word


def vocabulary_words(vocabulary: dict[str, int], exclude: Iterable[str] = ()) -> dict[str, int]:
    """{word: token id} of the pieces of a tokenizer's vocabulary that are whole lower-case words of 3 to 25 letters.
    Where pieces mark the start of a word (SentencePiece, byte-level BPE), only those count; else (WordPiece) every
    piece but continuations ('##...'). `exclude`: words left out (the concept's own)."""
    excluded = {w.lower() for w in exclude}
    marked = any(piece.startswith(WORD_STARTS) for piece in vocabulary)
    words = {}
    for piece, token in sorted(vocabulary.items(), key=lambda item: item[1]):
        if marked:
            if not piece.startswith(WORD_STARTS):
                continue
            piece = piece[1:]
        elif piece.startswith("##"):
            continue
        if WORD.match(piece) and piece not in excluded:
            words.setdefault(piece, token)
    return words


def nearest(candidates: torch.Tensor, targets: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` rows of candidates [N, D] whose best cosine with any row of targets [T, D] is
    highest, best first."""
    cos = (
        torch.nn.functional.normalize(candidates.float(), dim=-1)
        @ torch.nn.functional.normalize(targets.float(), dim=-1).T
    )
    best = cos.max(-1).values
    return best.topk(min(count, best.numel())).indices.tolist()


def draws_the_concept(to_concept: float, to_anchor: float, to_safe_word: float = float("inf")) -> bool:
    """Whether the model moves a prompt towards the concept: its velocity is nearer the concept prompt's than the
    safe counterpart's and than that of the same prompt with the nearest safe word (relative squared distances, as
    the training objective measures them)."""
    return to_concept < to_anchor and to_concept < to_safe_word


def words_of(texts: Iterable[str]) -> set[str]:
    """The lower-case words (3 to 25 letters or hyphens) of some texts."""
    return {w for text in texts for w in re.findall(r"[a-z][a-z-]*", text.lower()) if WORD.match(w)}


def with_wordings(prompts: PromptSet, words: Sequence[str], per_word: int, seed: int = 0) -> PromptSet:
    """`prompts` plus, for each word, `per_word` of its unsafe prompts (a seeded sample) with their subject written
    as that word and the same anchor; the words are recorded as mined."""
    rng = random.Random(seed)
    added = []
    for word in words:
        for source in rng.sample(prompts.unsafe, min(per_word, len(prompts.unsafe))):
            text = source.text.replace(source.subject, word, 1)
            added.append(UnsafePrompt(text, word, source.anchor))
    mined = [*prompts.mined, *(w for w in words if w not in prompts.mined)]
    return PromptSet(prompts.concept, [*prompts.unsafe, *added], list(prompts.safe), mined)
