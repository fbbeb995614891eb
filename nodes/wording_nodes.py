"""Mine Wordings: find, in the text encoder's own vocabulary, the words the model draws as the concept without the
Prompt Set naming them, and add prompts with them (saferope_core.wordings)."""

from __future__ import annotations

import random

import comfy.utils
import torch
from comfy_api.v0_0_2 import io

from ..saferope_core.prompts import content_span
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
                    "search",
                    default=1024,
                    min=8,
                    max=8192,
                    tooltip="Words the model screens (those nearest the subjects in the token table): one model call "
                    "each",
                ),
                io.Int.Input(
                    "checked",
                    default=32,
                    min=1,
                    max=512,
                    tooltip="Of the screened words, those the model draws most like the concept are checked "
                    "further (more noise, the safe words)",
                ),
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
        progress = comfy.utils.ProgressBar(len(near) + min(checked, len(near)) + len(rivals))
        asker = Asker(model, clip, latent_shape(model, width, height), seed)
        screened = model_screen(asker, near, examples, progress)[:checked]
        scores = model_check(asker, screened, examples, rivals, progress)
        by_nearness = sorted(scores, key=lambda w: scores[w][0] / scores[w][1])
        drawn = [w for w in by_nearness if draws_the_concept(*scores[w][:3])]
        kept = drawn[:keep]
        nearer_anchor = [w for w in screened if scores[w][0] >= scores[w][1]]
        nearer_safe = [w for w in screened if w not in drawn and w not in nearer_anchor]
        report = [
            f"{len(words)} vocabulary words, {len(near)} nearest in the table screened by the model, "
            f"{len(screened)} checked against the anchor and "
            f"{len(rivals)} safe words ({', '.join(rivals[:8])}{', ...' if len(rivals) > 8 else ''})",
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
