"""Mine Wordings: find, in the text encoder's own vocabulary, the words the model draws as the concept without the
Prompt Set naming them, and add prompts with them (saferope_core.wordings)."""

from __future__ import annotations

import random

import comfy.utils
import torch
from comfy_api.v0_0_2 import io

from ..saferope_core.prompts import content_span, subject_token_positions
from ..saferope_core.wordings import draws_the_concept, nearest, vocabulary_words, with_wordings
from .common import Prompts, checked, require_flux, seed_input, size_inputs
from .errors import SafeRoPEInputError
from .model_calls import context_token_ids, context_tokenizer, encode_prompt, latent_shape, load_model, velocity

CHECK_SIGMAS = (1.0, 0.8)  # noise levels the model is asked at: the start, where the picture's content is decided


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
            "counterpart. Adds unsafe prompts with them (same templates and anchors), so every guard built from the "
            "Prompt Set is trained on them; Save Safety Pack records them.",
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
        known = {w.lower() for u in prompts.unsafe for w in u.text.split()}
        words = vocabulary_words(tokenizer.get_vocab(), exclude=known | set(prompts.mined))
        names = list(words)
        targets = torch.stack([table[subject_ids(clip, s)].float().mean(0) for s in subjects])
        near = [names[i] for i in nearest(table[[words[w] for w in names]], targets, search)]
        rng = random.Random(seed)
        examples = {s: rng.choice([u for u in prompts.unsafe if u.subject == s]) for s in subjects}
        progress = comfy.utils.ProgressBar(len(near) + checked)
        in_context = contextual_order(clip, near, examples, progress)[:checked]
        scores = model_check(model, clip, in_context, examples, latent_shape(model, width, height), seed, progress)
        kept = [w for w, (c, a) in sorted(scores.items(), key=lambda x: x[1][0] / x[1][1]) if draws_the_concept(c, a)]
        kept = kept[:keep]
        report = [f"{len(words)} vocabulary words, {len(near)} nearest in the table, {len(in_context)} checked"]
        report += [
            f"kept {w}: distance to the concept {scores[w][0]:.4f}, to the anchor {scores[w][1]:.4f}" for w in kept
        ]
        report.append(
            "not kept (the model draws them nearer the anchor): " + ", ".join(w for w in in_context if w not in kept)
        )
        return io.NodeOutput(with_wordings(prompts, kept, per_word, seed), "\n".join(report))


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


def model_check(model, clip, words, examples, shape, seed, progress) -> dict[str, tuple[float, float]]:
    """{word: (distance to the concept, distance to the anchor)}: relative squared distances of the model's velocity
    on a concept prompt with the word in place of the subject, from the velocity on the prompt itself and on its
    anchor, summed over the examples, CHECK_SIGMAS and two noises."""
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
        scores = {}
        for word in words:
            to_concept = to_anchor = 0.0
            for s, u in examples.items():
                mine = velocities(u.text.replace(s, word, 1))
                to_concept += distance(mine, reference[s][0])
                to_anchor += distance(mine, reference[s][1])
            scores[word] = (to_concept, to_anchor)
            progress.update(1)
    return scores
