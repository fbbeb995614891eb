"""What Mine Wordings asks the text encoder and the model: the encoder's token table and word vectors, and the
model's velocities on a concept prompt with a candidate word in the subject's place (a one-call screen, then a
check at more noise levels and against safe words)."""

from __future__ import annotations

import torch

from ..saferope_core.prompts import content_span
from .model_calls import context_token_ids, encode_prompt, load_model, velocity

CHECK_SIGMAS = (1.0, 0.8)  # noise levels the model is asked at: the start, where the picture's content is decided


def token_table(clip, tokenizer) -> torch.Tensor | None:
    """The context encoder's token embedding table [vocabulary, width]: the smallest embedding of the text encoder
    that has a row for every token id of the context tokenizer."""
    if tokenizer is None:
        return None
    size = max(tokenizer.get_vocab().values()) + 1
    tables = [
        m.weight
        for m in clip.cond_stage_model.modules()
        if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= size
    ]
    return min(tables, key=len).detach() if tables else None


def word_vectors(clip, table: torch.Tensor, words: list[str]) -> torch.Tensor:
    """[len(words), width]: each word's mean token embedding (empty for no words)."""
    if not words:
        return table[:0].float()
    return torch.stack([table[subject_ids(clip, w)].float().mean(0) for w in words])


def subject_ids(clip, subject: str) -> list[int]:
    """The token ids of a subject alone (with a leading space, as inside a prompt)."""
    empty = context_token_ids(clip, "")
    ids = context_token_ids(clip, " " + subject)
    return ids[slice(*content_span(ids, empty))]


class Asker:
    """The model's velocities on prompts at fixed noisy latents: CHECK_SIGMAS twice, each with its own noise."""

    def __init__(self, model, clip, shape, seed: int):
        device = load_model(model)
        g = torch.Generator().manual_seed(seed)
        sigmas = [torch.tensor([s]) for _ in range(2) for s in CHECK_SIGMAS]
        self.points = [(torch.randn((1, *shape), generator=g).to(device), s) for s in sigmas]
        self.model, self.clip = model, clip

    def velocities(self, text: str, points: int | None = None) -> list[torch.Tensor]:
        """The velocities at the first `points` latents (all by default)."""
        prompt = encode_prompt(self.clip, text)
        return [velocity(self.model, x, sigma, prompt) for x, sigma in self.points[:points]]


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative squared distance of velocities a from b, summed over their latents."""
    return sum(float((u - w).square().sum() / w.square().sum()) for u, w in zip(a, b, strict=False))


def model_screen(asker: Asker, words: list[str], examples: dict, progress) -> list[str]:
    """`words` ordered by how much the model draws them like the concept: one velocity (the start of sampling) on
    each example prompt with the word in the subject's place, its distance to the prompt's own over its distance to
    the anchor's, least first."""
    with torch.no_grad():
        reference = {s: (asker.velocities(u.text, 1), asker.velocities(u.anchor, 1)) for s, u in examples.items()}
        ratios = {}
        for word in words:
            mine = {s: asker.velocities(u.text.replace(s, word, 1), 1) for s, u in examples.items()}
            to_concept = sum(distance(mine[s], reference[s][0]) for s in examples)
            ratios[word] = to_concept / max(sum(distance(mine[s], reference[s][1]) for s in examples), 1e-12)
            progress.update(1)
    return sorted(words, key=ratios.get)


def model_check(asker: Asker, words, examples, rivals, progress) -> dict[str, tuple]:
    """{word: (distance to the concept, to the anchor, to the nearest rival, that rival or None)}: relative squared
    distances of the model's velocity on a concept prompt with the word in place of the subject, from the velocity
    on the prompt itself, on its anchor and on the prompt with each rival (a safe word) in the subject's place,
    summed over the examples and the asker's latents."""
    with torch.no_grad():
        reference = {s: (asker.velocities(u.text), asker.velocities(u.anchor)) for s, u in examples.items()}
        safe = {}
        for rival in rivals:
            safe[rival] = {s: asker.velocities(u.text.replace(s, rival, 1)) for s, u in examples.items()}
            progress.update(1)
        scores = {}
        for word in words:
            mine = {s: asker.velocities(u.text.replace(s, word, 1)) for s, u in examples.items()}
            to_concept = sum(distance(mine[s], reference[s][0]) for s in examples)
            to_anchor = sum(distance(mine[s], reference[s][1]) for s in examples)
            to_rival = {r: sum(distance(mine[s], safe[r][s]) for s in examples) for r in rivals}
            nearest_rival = min(to_rival, key=to_rival.get, default=None)
            scores[word] = (to_concept, to_anchor, to_rival.get(nearest_rival, float("inf")), nearest_rival)
            progress.update(1)
    return scores
