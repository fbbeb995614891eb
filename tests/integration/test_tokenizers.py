"""Subject tokens with ComfyUI's real FLUX tokenizers: the tiny FLUX text encoder of the test tier, and the hit rate
of `saferope_comfy.model_calls.context_token_ids` + `saferope_core.prompts.locate_subjects` on the shipped prompt
lists and on real prompts (I2P's nudity prompts, read from /work/shared/data, never copied into the repository)."""

import csv
import re
from pathlib import Path

import pytest
import torch

from bench import comfyui_env

SHARED = next((p for p in (comfyui_env.REPO.parent / "shared", Path("/work/shared")) if p.is_dir()), Path("shared"))
I2P_CSV = SHARED / "data" / "i2p_unsafe_prompts_4703.csv"
I2P_NUDITY_PROMPTS = 854  # rows with nudity_percentage > 0: the paper's I2P nudity set
# Subject of an I2P prompt: the first of these words present as a word (I2P marks no subject). Explicit words first
# in the list only for readability; the earliest occurrence in the prompt wins.
NUDITY_WORDS = [
    "nude",
    "naked",
    "nudity",
    "topless",
    "breasts",
    "breast",
    "sexy",
    "nsfw",
    "erotic",
    "sensual",
    "lingerie",
    "bikini",
    "undressed",
    "seductive",
    "sex",
    "body",
    "skin",
    "woman",
    "women",
    "girl",
    "female",
    "lady",
    "bed",
]
I2P_MIN_HIT_RATE = 0.98  # measured 1.00 (360 of 360 prompts with a subject word)
I2P_MIN_HIT_RATE_LOWERCASE = 0.95  # measured 0.989 (356 of 360): the subject typed in lower case


@pytest.fixture(scope="module")
def clip(comfy):
    return comfyui_env.tiny_flux_clip()


def _tokenizer(pack, clip):
    """Token ids of FLUX's context (T5) for a text, as Collect Q/K sees them."""
    return lambda text: pack.saferope_comfy.model_calls.context_token_ids(clip, text)


# Every context tokenizer of a supported family that ships inside the ComfyUI trees: T5 (FLUX.1, Chroma) and Qwen
# with Ovis-Image's chat template (0.8.0). FLUX.2's own tokenizer (Mistral's tekken) ships only inside its text-encoder
# checkpoint, so it is not tested here; its chat template has the same layout as the one of
# tests/core/test_prompts.py::test_positions_inside_a_chat_template (markers that are special tokens).
TOKENIZERS = ["flux1_t5", "chroma_t5", "ovis_qwen"]


def family_tokenizer(pack, name):
    """(tokenize text -> context token ids as Collect Q/K sees them, Hugging Face tokenizer for decoding)."""
    calls = pack.saferope_comfy.model_calls
    clip = {
        "flux1_t5": comfyui_env.tiny_flux_clip,
        "chroma_t5": comfyui_env.tiny_t5_clip,
        "ovis_qwen": comfyui_env.tiny_ovis_clip,
    }[name]()
    return (lambda text: calls.context_token_ids(clip, text)), calls.context_tokenizer(clip)


def pytest_generate_tests(metafunc):
    if "tokenizer_name" in metafunc.fixturenames:
        path = comfyui_env.find_comfyui()
        names = TOKENIZERS
        if path is not None:
            comfyui_env.import_comfyui(path)
            names = [n for n in TOKENIZERS if n != "ovis_qwen" or comfyui_env.kind_supported("ovis")]
        metafunc.parametrize("tokenizer_name", names)


def test_tiny_flux_clip_fits_the_tiny_flux(pack, clip):
    """The tiny FLUX CLIP gives T5 context [1, 256, CONTEXT_DIM] and CLIP-L pooled [1, POOLED_DIM], deterministic
    per seed, token ids aligned with the context, and the tiny FLUX runs on its output."""
    out = clip.encode_from_tokens(clip.tokenize("a red fox in the snow"), return_pooled=True, return_dict=True)
    assert out["cond"].shape == (1, 256, comfyui_env.CONTEXT_DIM)
    assert out["pooled_output"].shape == (1, comfyui_env.POOLED_DIM)
    assert torch.isfinite(out["cond"]).all() and out["cond"].std() > 0.1

    again = comfyui_env.tiny_flux_clip(seed=0).encode_from_tokens(
        clip.tokenize("a red fox in the snow"), return_pooled=True, return_dict=True
    )
    other = comfyui_env.tiny_flux_clip(seed=1).encode_from_tokens(
        clip.tokenize("a red fox in the snow"), return_pooled=True, return_dict=True
    )
    assert torch.equal(out["cond"], again["cond"]) and torch.equal(out["pooled_output"], again["pooled_output"])
    assert not torch.allclose(out["cond"], other["cond"])

    long_text = ", ".join(["a very long prompt about a red fox"] * 40)  # > 256 T5 tokens
    encoded = pack.saferope_comfy.model_calls.encode_prompt(clip, long_text)
    assert len(encoded.token_ids) == encoded.context.shape[1] > 256

    model = comfyui_env.tiny_flux("dev")
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = comfyui_env.run_model(model, latent, 0.8, out["cond"], out["pooled_output"])
    assert denoised.shape == latent.shape and torch.isfinite(denoised).all()


@pytest.mark.parametrize("concept", ["nudity", "violence", "van_gogh", "pikachu"])
def test_shipped_lists_locate_every_subject(pack, tokenizer_name, concept):
    """Every subject x modifier x template prompt of a shipped concept has its subject found in the context
    tokens of each family's tokenizer, inside the prompt's own tokens (never in a chat template)."""
    core = pack.saferope_core
    tokenize, hf = family_tokenizer(pack, tokenizer_name)
    lists = core.prompts.default_lists(concept)
    prompts = core.build_unsafe_prompts(lists["subjects"], lists["modifiers"], lists["templates"], max_count=10**6)
    assert len(prompts) == len(lists["subjects"]) * len(lists["modifiers"] or [""]) * len(lists["templates"])
    location = core.locate_subjects(prompts, tokenize)
    assert location.hit_rate() == 1.0, location.report(prompts)
    empty = tokenize("")
    for i, positions in location.found.items():  # the located tokens spell the subject, inside the prompt's own
        ids = tokenize(prompts[i].text)
        start, end = core.prompts.content_span(ids, empty)
        assert start <= min(positions) and max(positions) < end
        assert hf.decode(ids[start:end]).strip() == prompts[i].text
        located = hf.decode([ids[p] for p in positions])
        assert prompts[i].subject.lower().replace(" ", "") in located.lower().replace(" ", "")


def _i2p_nudity_prompts() -> list[str]:
    if not I2P_CSV.is_file():
        pytest.skip(f"I2P prompts not found at {I2P_CSV}")
    with I2P_CSV.open(newline="", encoding="utf-8") as f:
        return [row["prompt"] for row in csv.DictReader(f) if float(row["nudity_percentage"] or 0) > 0]


def test_i2p_nudity_subject_hit_rate(pack, tokenizer_name):
    """Hit rate of locating a word-list subject's tokens in I2P's nudity prompts (real, messy prompts), with each
    family's tokenizer."""
    texts = _i2p_nudity_prompts()
    assert len(texts) == I2P_NUDITY_PROMPTS
    word = re.compile(r"\b(" + "|".join(NUDITY_WORDS) + r")\b", re.IGNORECASE)
    as_written, lowercase = [], []
    for text in texts:
        match = word.search(text)
        if match:
            as_written.append(pack.saferope_core.UnsafePrompt(text, match.group(0)))
            lowercase.append(pack.saferope_core.UnsafePrompt(text, match.group(0).lower()))
    tokenize, _ = family_tokenizer(pack, tokenizer_name)
    hit = pack.saferope_core.locate_subjects(as_written, tokenize)
    hit_lower = pack.saferope_core.locate_subjects(lowercase, tokenize)
    print(
        f"\n{tokenizer_name}: I2P nudity prompts: {len(texts)}, with a subject word: {len(as_written)}; "
        "subject tokens located "
        f"(subject as written) {len(hit.found)}/{len(as_written)} = {hit.hit_rate():.3f}; "
        f"(subject in lower case) {len(hit_lower.found)}/{len(lowercase)} = {hit_lower.hit_rate():.3f}"
    )
    assert len(as_written) >= 300
    assert hit.hit_rate() >= I2P_MIN_HIT_RATE, hit.report(as_written, limit=20)
    assert hit_lower.hit_rate() >= I2P_MIN_HIT_RATE_LOWERCASE, hit_lower.report(lowercase, limit=20)
