"""Prompt sets (subject x modifier x template) and locating the subject's tokens with different tokenizers."""

import re

import pytest

from saferope_core import UnsafePrompt, build_unsafe_prompts, clean_lines, locate_subjects
from saferope_core.prompts import (
    content_span,
    default_concepts,
    default_lists,
    read_prompt_file,
    subject_token_positions,
)

BOS, EOS, PAD = 1, 2, 3


class Vocab:
    """Stable ids for text pieces (ids from 10 up, so they never collide with BOS / EOS / PAD)."""

    def __init__(self):
        self.ids = {}

    def __call__(self, pieces):
        return [self.ids.setdefault(p, len(self.ids) + 10) for p in pieces]


def whitespace_tokenizer():
    """Words and punctuation marks, nothing added."""
    vocab = Vocab()
    return lambda text: vocab(re.findall(r"\w+|[^\w\s]", text))


def bos_eos_tokenizer():
    """Like the whitespace tokenizer, with BOS in front and EOS at the end of every text (also of '')."""
    vocab = Vocab()
    return lambda text: [BOS, *vocab(re.findall(r"\w+|[^\w\s]", text)), EOS]


def sentencepiece_tokenizer():
    """T5-like: every word starts with a '▁' piece, long words split into 4-letter pieces, EOS at the end."""
    vocab = Vocab()

    def tokenize(text):
        pieces = []
        for word in text.split():
            for i, part in enumerate(re.findall(r"\w+|[^\w\s]", word)):
                chunks = [part[j : j + 4] for j in range(0, len(part), 4)]
                pieces += [("▁" + c if i == 0 and k == 0 else c) for k, c in enumerate(chunks)]
        return [*vocab(pieces), EOS]

    return tokenize


def gpt2_tokenizer():
    """Byte-level-BPE-like: a word preceded by a space is a different token (' cat' vs 'cat')."""
    vocab = Vocab()
    return lambda text: vocab(re.findall(r" ?\w+| ?[^\w\s]", text))


def chat_template_tokenizer(pad_to: int = 0, pad_left: bool = False):
    """An LLM encoder's tokenizer: the text inside a system/chat template that itself contains common words
    (' the', ' image', ' a', ' nude'), byte-level-BPE-like word tokens, optionally padded to `pad_to` tokens."""
    vocab = Vocab()
    template = "<sys> Describe the image in detail, a nude model or not: <inst>{}</inst> <assistant>"

    def tokenize(text):
        ids = vocab(re.findall(r"<\w+>|</\w+>| ?\w+| ?[^\w\s]", template.format(text)))
        padding = [PAD] * max(pad_to - len(ids), 0)
        return padding + ids if pad_left else ids + padding

    return tokenize


# --- building prompts -----------------------------------------------------------------------------------

SUBJECTS = ["cat", "red car", "old tree"]
MODIFIERS = ["at night", "in the rain"]
TEMPLATES = ["a photo of {subject} {modifier}", "{subject}, painting"]


def test_clean_lines():
    assert clean_lines("  cat \n\n# a comment\n  # indented comment\nred car\n") == ["cat", "red car"]


def test_full_product():
    """Every subject x modifier x template combination once, each with its subject."""
    prompts = build_unsafe_prompts(SUBJECTS, MODIFIERS, TEMPLATES)
    assert len(prompts) == len(SUBJECTS) * len(MODIFIERS) * len(TEMPLATES)
    assert len({p.text for p in prompts}) == len(prompts)
    assert all(isinstance(p, UnsafePrompt) and p.subject in p.text for p in prompts)
    assert {p.subject for p in prompts} == set(SUBJECTS)
    assert "a photo of red car in the rain" in {p.text for p in prompts}
    for modifier in MODIFIERS:
        assert sum(modifier in p.text for p in prompts) == len(SUBJECTS) * len(TEMPLATES)


def test_template_without_modifier_slot_appends_it():
    prompts = build_unsafe_prompts(["cat"], ["at night"], ["{subject}, painting"])
    assert [p.text for p in prompts] == ["cat, painting, at night"]


def test_no_modifiers():
    """An empty modifier list gives one prompt per subject x template, without stray spaces or commas."""
    prompts = build_unsafe_prompts(["cat", "dog"], [], ["a photo of {subject} {modifier} here", "{subject} art"])
    assert sorted(p.text for p in prompts) == ["a photo of cat here", "a photo of dog here", "cat art", "dog art"]


def test_empty_modifier_leaves_no_dangling_comma():
    prompts = build_unsafe_prompts(["cat"], ["", "at night"], ["a photo of a {subject}, {modifier}"])
    assert [p.text for p in prompts] == ["a photo of a cat", "a photo of a cat, at night"]


def test_templates_without_subject_are_skipped():
    prompts = build_unsafe_prompts(["cat"], ["wet"], ["no slot here", "{subject} {modifier}"])
    assert [p.text for p in prompts] == ["cat wet"]


def test_seeded_sample_respects_max_count_and_is_deterministic():
    full = [p.text for p in build_unsafe_prompts(SUBJECTS, MODIFIERS, TEMPLATES)]
    sample = build_unsafe_prompts(SUBJECTS, MODIFIERS, TEMPLATES, max_count=5, seed=3)
    assert len(sample) == 5 and len({p.text for p in sample}) == 5
    assert all(p.text in full for p in sample)
    assert sample == build_unsafe_prompts(SUBJECTS, MODIFIERS, TEMPLATES, max_count=5, seed=3)
    others = [build_unsafe_prompts(SUBJECTS, MODIFIERS, TEMPLATES, max_count=5, seed=s) for s in range(4, 9)]
    assert any(o != sample for o in others)
    assert len(build_unsafe_prompts(SUBJECTS, MODIFIERS, TEMPLATES, max_count=12)) == 12  # exactly all


@pytest.mark.parametrize(
    "subjects, modifiers, templates, max_count, word",
    [
        ([], MODIFIERS, TEMPLATES, 10, "subject list is empty"),
        (SUBJECTS, MODIFIERS, [], 10, "template list is empty"),
        (SUBJECTS, MODIFIERS, ["a photo", "{modifier} art"], 10, "{subject}"),
        (SUBJECTS, MODIFIERS, TEMPLATES, 0, "max_count"),
    ],
)
def test_unusable_input_raises(subjects, modifiers, templates, max_count, word):
    with pytest.raises(ValueError) as err:
        build_unsafe_prompts(subjects, modifiers, templates, max_count=max_count)
    assert word in str(err.value)


# --- shipped lists and prompt files -------------------------------------------------------------------


def test_default_lists_build_clean_prompts():
    """Every shipped concept has usable lists; its prompts hold the subject and tokenise to find it."""
    concepts = default_concepts()
    assert {"nudity", "violence", "van_gogh", "pikachu"} <= set(concepts)
    tok = sentencepiece_tokenizer()
    for concept in concepts:
        lists = default_lists(concept)
        assert all(
            lists[k] and all(isinstance(x, str) for x in lists[k])
            for k in ("subjects", "modifiers", "templates", "safe")
        )
        prompts = build_unsafe_prompts(lists["subjects"], lists["modifiers"], lists["templates"], max_count=100)
        assert len(prompts) == min(100, len(lists["subjects"]) * len(lists["modifiers"]) * len(lists["templates"]))
        for p in prompts:
            assert p.subject in p.text and "  " not in p.text and not p.text.endswith(","), p.text
        assert locate_subjects(prompts, tok).missing == []


def test_unknown_default_concept():
    with pytest.raises(ValueError, match="nudity"):  # the message lists the known concepts
        default_lists("no_such_concept")


def test_read_prompt_file_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# captions\na cat\n\n  a dog  \na bird\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a cat", "a dog", "a bird"]
    assert read_prompt_file(path, limit=2) == ["a cat", "a dog"]


def test_read_prompt_file_csv_picks_the_prompt_column(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('id,Caption,score\n1,"a cat, sleeping",0.5\n2,,0.1\n3,a dog,0.9\n4,a bird,0.2\n', encoding="utf-8")
    assert read_prompt_file(path) == ["a cat, sleeping", "a dog", "a bird"]
    assert read_prompt_file(path, limit=2) == ["a cat, sleeping", "a dog"]
    other = tmp_path / "plain.csv"
    other.write_text("description,score\na red car,1\na boat,2\n", encoding="utf-8")
    assert read_prompt_file(other) == ["a red car", "a boat"]  # no known header: the first column


def test_read_prompt_file_missing(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_prompt_file(tmp_path / "absent.txt")


# --- subject tokens -------------------------------------------------------------------------------------


def test_positions_with_whitespace_tokenizer():
    tok = whitespace_tokenizer()
    assert subject_token_positions("a photo of a red car at night", "red car", tok) == [4, 5]
    assert subject_token_positions("cat and cat, together", "cat", tok) == [0, 2]
    assert subject_token_positions("a photo of a cat", "Cat", tok) == [4]  # lower-case fallback
    assert subject_token_positions("a photo of a dog", "cat", tok) == []
    assert subject_token_positions("a red bus and a car", "red car", tok) == []  # not as a sequence


def test_positions_skip_added_special_tokens():
    """BOS / EOS that the tokenizer adds to every text are not part of the subject; positions count BOS."""
    tok = bos_eos_tokenizer()
    ids = tok("a photo of a red car")
    positions = subject_token_positions("a photo of a red car", "red car", tok)
    assert positions == [5, 6]
    assert [ids[i] for i in positions] == tok("red car")[1:-1]


def test_positions_with_sentencepiece_word_starts():
    """'▁'-marked word starts: multi-piece subjects are found, a subject inside a longer word is not."""
    tok = sentencepiece_tokenizer()
    # ▁a ▁pic ▁of ▁unic orns , ▁at ▁dusk EOS
    assert subject_token_positions("a pic of unicorns, at dusk", "unicorns", tok) == [3, 4]
    # ▁popc orn ▁and ▁corn EOS: only the word 'corn', not the end of 'popcorn'
    assert subject_token_positions("popcorn and corn", "corn", tok) == [3]
    # ▁a ▁phot o ▁of ▁a ▁red ▁car EOS
    assert subject_token_positions("a photo of a red car", "red car", tok) == [5, 6]


def test_positions_with_space_prefixed_bpe():
    """' cat' inside a prompt differs from 'cat' alone: the space variant of the subject is tried."""
    tok = gpt2_tokenizer()
    assert subject_token_positions("a photo of a cat", "cat", tok) == [4]
    assert subject_token_positions("cat on a mat", "cat", tok) == [0]


def test_positions_with_space_prefixed_bpe_find_every_occurrence():
    """Every occurrence, as documented: 'cat' at the start and ' cat' later on."""
    tok = gpt2_tokenizer()
    assert subject_token_positions("cat sees another cat", "cat", tok) == [0, 3]


@pytest.mark.parametrize("pad_to, pad_left", [(0, False), (64, False), (64, True)])
def test_positions_inside_a_chat_template(pad_to, pad_left):
    """Only the prompt's own tokens count: the template's ' nude' and ' image' are never the subject, padding on
    either side is skipped, and the span of the prompt's own tokens is exact."""
    tok = chat_template_tokenizer(pad_to, pad_left)
    ids = tok("a nude woman, image")
    start, end = content_span(ids, tok(""))
    assert end - start == len(whitespace_tokenizer()("a nude woman, image"))
    positions = subject_token_positions("a nude woman, image", "nude", tok)
    assert positions == [start + 1]
    assert subject_token_positions("an image of a cat", "image", tok) == [
        content_span(tok("an image of a cat"), tok(""))[0] + 1
    ]
    assert subject_token_positions("a cat", "nude", tok) == []  # only the template says 'nude'
    start, end = content_span(tok(""), tok(""))
    assert start == end  # the empty text has no tokens of its own


def test_content_span_of_plain_tokenizers():
    """No template: everything but the added start/end tokens and padding."""
    assert content_span(whitespace_tokenizer()("a red car"), []) == (0, 3)
    tok = bos_eos_tokenizer()
    assert content_span(tok("a red car"), tok("")) == (1, 4)
    padded = [5, 6, 7, EOS, PAD, PAD, PAD]  # T5: the end token, then padding
    assert content_span(padded, [EOS, PAD, PAD, PAD, PAD, PAD, PAD]) == (0, 3)
    clip_like = [BOS, 5, 6, EOS, EOS, EOS]  # CLIP: pads with its end token
    assert content_span(clip_like, [BOS, EOS, EOS, EOS, EOS, EOS]) == (1, 3)


def test_locate_subjects_reports_missing():
    tok = whitespace_tokenizer()
    prompts = [
        UnsafePrompt("a cat at night", "cat"),
        UnsafePrompt("a dog at night", "wolf"),
        UnsafePrompt("red car, red car", "red car"),
    ]
    location = locate_subjects(prompts, tok)
    assert location.found == {0: [1], 2: [0, 1, 3, 4]}
    assert location.missing == [1]
    assert location.hit_rate() == pytest.approx(2 / 3)
    report = location.report(prompts)
    assert "found in 2 of 3" in report and "'wolf'" in report and "'cat'" not in report


def test_locate_subjects_report_is_limited():
    prompts = [UnsafePrompt(f"prompt {i}", "absent") for i in range(8)]
    location = locate_subjects(prompts, whitespace_tokenizer())
    assert location.missing == list(range(8)) and location.hit_rate() == 0.0
    report = location.report(prompts, limit=3)
    assert report.count("not found") == 3 and "and 5 more" in report
