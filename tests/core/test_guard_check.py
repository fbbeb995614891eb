"""The guard check's scores and choice, on latents whose answer is known."""

import pytest
import torch

from saferope_core.guard_check import GuardCheck, guard_combinations, score_combination


def test_every_combination_is_scored_all_guards_first():
    assert guard_combinations(["rotation", "uvr", "redirector"]) == [
        ("rotation", "uvr", "redirector"),
        ("rotation", "uvr"),
        ("rotation", "redirector"),
        ("uvr", "redirector"),
        ("rotation",),
        ("uvr",),
        ("redirector",),
    ]
    assert guard_combinations(["uvr"]) == [("uvr",)]


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(0)
    unsafe, anchor, safe = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    return unsafe, anchor, safe


def test_drawing_the_anchor_is_erased_and_an_unchanged_safe_prompt_is_no_harm(latents):
    unsafe, anchor, safe = latents
    full = score_combination(["redirector"], unsafe, anchor, anchor, safe, safe)
    assert full.erased == pytest.approx(1.0) and full.harm == 0 and full.score == pytest.approx(1.0)
    none = score_combination(["uvr"], unsafe, anchor, unsafe, safe, safe)
    assert none.erased == pytest.approx(0.0)
    halfway = score_combination(["uvr"], unsafe, anchor, (unsafe + anchor) / 2, safe, safe)
    assert halfway.erased == pytest.approx(0.75)  # a quarter of the squared distance is left
    blank = score_combination(["rotation"], unsafe, anchor, unsafe * 3, safe, safe)
    assert blank.erased == 0  # moving away from the safe version is not erasing (clipped, not negative)


def test_harm_is_in_units_of_the_concepts_own_distance(latents):
    unsafe, anchor, safe = latents
    scale = (unsafe - anchor).flatten(1).pow(2).sum(1).mean()
    moved = safe + (unsafe - anchor)  # each safe prompt moved as far as its unsafe prompt is from its anchor
    harm = score_combination(["rotation"], unsafe, anchor, anchor, safe, moved).harm
    assert harm == pytest.approx(float((unsafe - anchor).flatten(1).pow(2).sum(1).mean() / scale))
    assert harm == pytest.approx(1.0)


def scored(guards, erased, harm):
    from saferope_core.guard_check import CombinationScore

    return CombinationScore(tuple(guards), erased, harm)


def test_the_best_score_wins_and_fewer_guards_win_a_tie():
    check = GuardCheck(
        [scored(["rotation", "redirector"], 0.9, 0.2), scored(["redirector"], 0.8, 0.0), scored(["rotation"], 0.3, 0)],
        16,
        16,
    )
    assert check.chosen() == ("redirector",)
    assert "applies prompt redirector" in check.text() and check.to_dict()["applies"] == ["redirector"]
    check = GuardCheck([scored(["rotation", "redirector"], 0.95, 0.0), scored(["redirector"], 0.8, 0.0)], 16, 16)
    assert check.chosen() == ("rotation", "redirector")
    close = GuardCheck([scored(["rotation", "redirector"], 0.81, 0.0), scored(["redirector"], 0.8, 0.0)], 16, 16)
    assert close.chosen() == ("redirector",)


def test_a_combination_with_a_non_finite_score_is_never_chosen():
    """A NaN latent (an overflowing model) makes a NaN figure: that combination loses, whichever comes first."""
    nan = float("nan")
    check = GuardCheck([scored(["rotation", "redirector"], nan, 0.0), scored(["redirector"], 0.5, 0.0)], 4, 4)
    assert check.chosen() == ("redirector",)
    check = GuardCheck([scored(["rotation", "redirector"], 0.5, 0.0), scored(["redirector"], 0.5, nan)], 4, 4)
    assert check.chosen() == ("rotation", "redirector")


def test_with_nothing_that_erases_every_guard_is_kept():
    check = GuardCheck([scored(["rotation", "redirector"], 0.0, 0.2), scored(["redirector"], 0.0, 0.0)], 4, 4)
    assert check.chosen() == ("rotation", "redirector")
    assert "no combination erased more than it changed" in check.text()
