"""Mine Wordings: find, in the text encoder's own vocabulary, the words the model draws as the concept without the
Prompt Set naming them, and add prompts with them (saferope_core.wordings)."""

from __future__ import annotations

import random

import comfy.utils
from comfy_api.v0_0_2 import io

from ..saferope_comfy.model_calls import context_tokenizer, latent_shape
from ..saferope_comfy.wordings import Asker, model_check, model_screen, token_table, word_vectors
from ..saferope_core.wordings import draws_the_concept, nearest, vocabulary_words, with_wordings, words_of
from .common import Prompts, checked, require_flux, seed_input, size_inputs
from .errors import SafeRoPEInputError

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
