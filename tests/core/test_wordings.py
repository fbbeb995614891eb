"""Mining wordings: whole words of a vocabulary, nearest by cosine, the model's verdict, added prompts."""

import torch

from saferope_core.prompts import PromptSet, UnsafePrompt
from saferope_core.wordings import draws_the_concept, nearest, vocabulary_words, with_wordings


def test_vocabulary_words_are_whole_words_in_every_tokenizer_style():
    sentencepiece = {"\u2581nude": 1, "nude": 2, "\u2581ab": 3, "\u25813d": 4, "\u2581naked": 5, "<pad>": 0}
    assert vocabulary_words(sentencepiece, exclude=["Nude"]) == {"naked": 5}  # continuation 'nude' is not a word
    bpe = {"\u0120bare": 7, "bare": 8, "\u0120x": 9}
    assert vocabulary_words(bpe) == {"bare": 7}
    wordpiece = {"bare": 1, "##ly": 2, "[CLS]": 3, "nu-de": 4, "Caps": 5}
    assert vocabulary_words(wordpiece) == {"bare": 1, "nu-de": 4}


def test_nearest_ranks_by_the_best_cosine_with_any_target():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    targets = torch.tensor([[0.0, 2.0], [3.0, 0.1]])
    assert nearest(candidates, targets, 3) == [1, 0, 2] and nearest(candidates, targets, 10)[-1] == 3


def test_the_model_decides():
    assert draws_the_concept(0.1, 0.2) and not draws_the_concept(0.2, 0.1)
    assert draws_the_concept(0.1, 0.2, 0.15) and not draws_the_concept(0.1, 0.2, 0.05)  # nearer a safe word


def test_mined_words_become_subjects_with_the_same_anchors():
    unsafe = [UnsafePrompt(f"a nude {t}", "nude", f"a clothed {t}") for t in ("woman", "man", "person")]
    prompts = PromptSet("nudity", unsafe, ["a car"])
    more = with_wordings(prompts, ["bare", "unclad"], per_word=2, seed=0)
    added = more.unsafe[3:]
    assert len(added) == 4 and more.mined == ["bare", "unclad"] and more.safe == ["a car"]
    for prompt in added:
        assert prompt.subject in ("bare", "unclad") and prompt.text == prompt.anchor.replace("clothed", prompt.subject)
    assert with_wordings(more, ["bare"], 1).mined == ["bare", "unclad"]  # recorded once
