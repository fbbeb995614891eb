"""Mine Wordings: find, in the text encoder's own vocabulary, the words the model draws as the concept without the
Prompt Set naming them, and add prompts with them (saferope_core.wordings)."""

from __future__ import annotations

import random

import comfy.utils
import torch
from comfy_api.v0_0_2 import io

from ..saferope_core.prompts import content_span, subject_token_positions
from ..saferope_core.wordings import draws_the_concept, nearest, vocabulary_words, with_wordings, words_of
from .common import Prompts, checked, require_flux, seed_input, size_inputs
from .errors import SafeRoPEInputError
from .model_calls import context_token_ids, context_tokenizer, encode_prompt, latent_shape, load_model, velocity

CHECK_SIGMAS = (1.0, 0.8)  # noise levels the model is asked at: the start, where the picture's content is decided
SAFE_RIVALS = 16  # safe words (of the safe prompts) nearest the subjects that a kept word must be farther from


class MineWordings(io.ComfyNode):
    NODE = "Mine Wordings"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MineWordings",
            display_name=cls.NODE,
            category="SafeRoPE/Collect & Train",
            description="Finds words the model draws as the concept although the Prompt Set does not name them: "
            "whole words of the text encoder's vocabulary nearest the subjects (in its token table, then in "
            "context), kept only where the model moves the prompt towards the concept rather than the safe "
            "counterpart or the safe words nearest the concept (words of the safe prompts, never mined themselves). "
            "Adds unsafe prompts with them (same templates and anchors), so every guard built from the Prompt Set "
            "is trained on them; Save Safety Pack records them.",
            inputs=[
                io.Model.Input("model", tooltip="The model the guards are built for"),
                io.Clip.Input("clip", tooltip="That model's text encoder"),
                Prompts.Input("prompts", tooltip="From SafeRoPE Prompt Set (its anchors say what is safe)"),
                io.Int.Input(
                    "search", default=256, min=8, max=4096, tooltip="Words compared in context (nearest in the table)"
                ),
                io.Int.Input("checked", default=32, min=1, max=512, tooltip="Words the model is asked about"),
                io.Int.Input("keep", default=8, min=1, max=128, tooltip="At most this many words are added"),
                io.Int.Input("per_word", default=8, min=1, max=256, tooltip="Unsafe prompts added per word kept"),
                *size_inputs("the model is asked at"),
                seed_input("Seed of the noise and of the prompts chosen"),
            ],
            outputs=[
                Prompts.Output(
                    "mined_prompts", display_name="prompts", tooltip="The Prompt Set with the mined wordings"
                ),
                io.String.Output("report", display_name="report", tooltip="The words kept and how near each is"),
            ],
        )

    @classmethod
    @checked
    def execute(cls, model, clip, prompts, search, checked, keep, per_word, width, height, seed) -> io.NodeOutput:
        require_flux(cls.NODE, model)
        subjects = sorted({u.subject for u in prompts.unsafe if u.anchor != u.text})
        if not subjects:
            raise SafeRoPEInputError(cls.NODE, "prompts", "no unsafe prompt has an anchor", "Give the subjects anchors")
        tokenizer = context_tokenizer(clip)
        table = token_table(clip, tokenizer)
        if tokenizer is None or table is None:
            raise SafeRoPEInputError(cls.NODE, "clip", "its vocabulary or token table cannot be read", "")
        known = words_of(u.text for u in prompts.unsafe)
        safe_words = sorted(words_of(prompts.safe) - known)  # the user's safe words: never mined, and rivals
        words = vocabulary_words(tokenizer.get_vocab(), exclude=known | set(safe_words) | set(prompts.mined))
        names = list(words)
        targets = word_vectors(clip, table, subjects)
        near = [names[i] for i in nearest(table[[words[w] for w in names]], targets, search)]
        rivals = [safe_words[i] for i in nearest(word_vectors(clip, table, safe_words), targets, SAFE_RIVALS)]
        rng = random.Random(seed)
        examples = {s: rng.choice([u for u in prompts.unsafe if u.subject == s]) for s in subjects}
        progress = comfy.utils.ProgressBar(len(near) + checked + len(rivals))
        in_context = contextual_order(clip, near, examples, progress)[:checked]
        shape = latent_shape(model, width, height)
        scores = model_check(model, clip, in_context, examples, rivals, shape, seed, progress)
        by_nearness = sorted(scores, key=lambda w: scores[w][0] / scores[w][1])
        drawn = [w for w in by_nearness if draws_the_concept(*scores[w][:3])]
        kept = drawn[:keep]
        nearer_anchor = [w for w in in_context if scores[w][0] >= scores[w][1]]
        nearer_safe = [w for w in in_context if w not in drawn and w not in nearer_anchor]
        report = [
            f"{len(words)} vocabulary words, {len(near)} nearest in the table, {len(in_context)} checked against "
            f"the anchor and {len(rivals)} safe words ({', '.join(rivals[:8])}{', ...' if len(rivals) > 8 else ''})",
            *(kept_line(w, *scores[w]) for w in kept),
            "not kept (the model draws them nearer the anchor): " + ", ".join(nearer_anchor),
        ]
        if nearer_safe:
            listed = ", ".join(f"{w} ({scores[w][3]})" for w in nearer_safe)
            report.append(f"not kept (the model draws them nearer a safe word): {listed}")
        if drawn[keep:]:
            report.append(f"not kept (more than keep = {keep}): " + ", ".join(drawn[keep:]))
        return io.NodeOutput(with_wordings(prompts, kept, per_word, seed), "\n".join(report))


def kept_line(word: str, to_concept: float, to_anchor: float, to_safe: float, safe_word: str | None) -> str:
    line = f"kept {word}: distance to the concept {to_concept:.4f}, to the anchor {to_anchor:.4f}"
    return line if safe_word is None else f"{line}, to the nearest safe word ({safe_word}) {to_safe:.4f}"


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


def encoded_word(clip, text: str, word: str) -> torch.Tensor | None:
    """The mean encoder output at `word`'s tokens inside `text`, or None where it cannot be found."""
    prompt = encode_prompt(clip, text)
    positions = [p - prompt.cut for p in subject_token_positions(text, word, lambda t: context_token_ids(clip, t))]
    positions = [p for p in positions if 0 <= p < prompt.context.shape[1]]
    return prompt.context[0, positions].float().mean(0) if positions else None


def contextual_order(clip, words: list[str], examples: dict, progress) -> list[str]:
    """`words` ordered by how near, written into one of the concept's prompts, their encoding lies to the subject's
    own encoding in that prompt."""
    subjects = {s: encoded_word(clip, u.text, s) for s, u in examples.items()}
    vectors, found = [], []
    for word in words:
        best = None
        for s, u in examples.items():
            mine = encoded_word(clip, u.text.replace(s, word, 1), word)
            if mine is not None and subjects[s] is not None:
                cos = float(torch.nn.functional.cosine_similarity(mine, subjects[s], dim=0))
                best = cos if best is None else max(best, cos)
        progress.update(1)
        if best is not None:
            vectors.append(best)
            found.append(word)
    order = sorted(range(len(found)), key=lambda i: -vectors[i])
    return [found[i] for i in order]


def model_check(model, clip, words, examples, rivals, shape, seed, progress) -> dict[str, tuple]:
    """{word: (distance to the concept, to the anchor, to the nearest rival, that rival or None)}: relative squared
    distances of the model's velocity on a concept prompt with the word in place of the subject, from the velocity
    on the prompt itself, on its anchor and on the prompt with each rival (a safe word) in the subject's place,
    summed over the examples, CHECK_SIGMAS and two noises."""
    device = load_model(model)
    g = torch.Generator().manual_seed(seed)
    points = [
        (torch.randn((1, *shape), generator=g).to(device), torch.tensor([s])) for _ in range(2) for s in CHECK_SIGMAS
    ]

    def velocities(text: str) -> list[torch.Tensor]:
        prompt = encode_prompt(clip, text)
        return [velocity(model, x, sigma, prompt) for x, sigma in points]

    def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return sum(float((u - w).square().sum() / w.square().sum()) for u, w in zip(a, b, strict=True))

    with torch.no_grad():
        reference = {s: (velocities(u.text), velocities(u.anchor)) for s, u in examples.items()}
        safe = {}
        for rival in rivals:
            safe[rival] = {s: velocities(u.text.replace(s, rival, 1)) for s, u in examples.items()}
            progress.update(1)
        scores = {}
        for word in words:
            mine = {s: velocities(u.text.replace(s, word, 1)) for s, u in examples.items()}
            to_concept = sum(distance(mine[s], reference[s][0]) for s in examples)
            to_anchor = sum(distance(mine[s], reference[s][1]) for s in examples)
            to_rival = {r: sum(distance(mine[s], safe[r][s]) for s in examples) for r in rivals}
            nearest_rival = min(to_rival, key=to_rival.get, default=None)
            scores[word] = (to_concept, to_anchor, to_rival.get(nearest_rival, float("inf")), nearest_rival)
            progress.update(1)
    return scores
