"""Anchors (the safe counterpart each unsafe prompt is redirected to), the redirect objective and the held-out
report of a training run."""

import pytest
import torch

from saferope_core import PromptSetError, TrainingRecipe, build_unsafe_prompts, redirect_gap, redirect_loss
from saferope_core.held_out import (
    KEPT,
    MOVED,
    PARTLY_MOVED,
    PARTLY_REDIRECTED,
    REDIRECTED,
    HeldOutReport,
    held_out_report,
    held_out_split,
)
from saferope_core.prompts import default_concepts, default_lists, parse_anchors

SUBJECTS = ["nude woman", "naked man"]


def test_anchor_lines_per_subject_and_for_all():
    assert parse_anchors("nude woman: clothed woman\nNAKED MAN : man in a suit", SUBJECTS) == {
        "nude woman": "clothed woman",
        "naked man": "man in a suit",
    }
    assert parse_anchors("a person", SUBJECTS) == dict.fromkeys(SUBJECTS, "a person")
    assert parse_anchors("nude woman: clothed woman", SUBJECTS)["naked man"] == ""  # no line: removed


def test_anchor_line_of_an_unknown_subject_is_refused():
    with pytest.raises(PromptSetError, match="nude woman"):
        parse_anchors("nude woman: clothed\ncat: dog", SUBJECTS)


def test_prompts_carry_their_anchor_in_the_same_template():
    prompts = build_unsafe_prompts(
        SUBJECTS, ["on a beach", ""], ["a photo of a {subject}, {modifier}"], anchors={"nude woman": "clothed woman"}
    )
    pairs = {(p.text, p.anchor) for p in prompts}
    assert ("a photo of a nude woman, on a beach", "a photo of a clothed woman, on a beach") in pairs
    assert ("a photo of a naked man", "a photo of a") in pairs  # removed subject, no dangling comma or space
    assert all("  " not in a and not a.endswith(",") for _, a in pairs)


def test_every_shipped_subject_has_an_anchor():
    for concept in default_concepts():
        lists = default_lists(concept)
        assert set(lists["anchors"]) == set(lists["subjects"]), concept
        assert all(a.strip() and a not in lists["subjects"] for a in lists["anchors"].values()), concept


def test_held_out_split_is_seeded_disjoint_and_bounded():
    items = list(range(100))
    train, held = held_out_split(items, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert held_out_split(items, seed=3) == (train, held) and held_out_split(items, seed=4)[1] != held
    assert len(held_out_split(list(range(1000)))[1]) == 16
    assert held_out_split([1, 2, 3]) == ([1, 2, 3], [])
    assert len(held_out_split([1, 2, 3, 4])[1]) == 1


def velocity_of(table):
    """A 'model' whose velocity is a fixed vector per prompt name (x and sigma ignored, shape kept)."""
    return lambda x, sigma, cond: table[cond].expand_as(x)


def test_redirect_gap_is_one_at_the_start_and_zero_at_the_anchor():
    torch.manual_seed(0)
    base = {"unsafe": torch.randn(1, 4, 2, 2), "anchor": torch.randn(1, 4, 2, 2)}
    noise = torch.randn(1, 4, 2, 2)
    sigma = torch.tensor([1.0])
    assert redirect_gap(velocity_of(base), velocity_of(base), "unsafe", "anchor", noise, sigma).item() == (
        pytest.approx(1.0)
    )
    redirected = {"unsafe": base["anchor"]}
    gap = redirect_gap(velocity_of(base), velocity_of(redirected), "unsafe", "anchor", noise, sigma)
    assert gap.item() == pytest.approx(0.0, abs=1e-6)
    recipe = TrainingRecipe(objective="redirect")
    assert redirect_loss(gap, recipe) < redirect_loss(torch.ones(1), recipe)  # closer to the anchor is better


def test_held_out_report_measures_and_judges():
    torch.manual_seed(0)
    v = {name: torch.randn(1, 4, 2, 2) for name in ("unsafe", "anchor", "blue", "green")}
    noise = torch.randn(1, 4, 2, 2)
    redirected = {**v, "unsafe": v["anchor"], "green": v["green"] * 1.5}
    report = held_out_report(
        "redirect",
        velocity_of(v),
        velocity_of(redirected),
        [("unsafe", "anchor")],
        [("blue", "blue"), ("g", "green")],
        noise,
    )
    assert report.anchor_before > 0 and report.anchor_after == pytest.approx(0.0, abs=1e-6)
    assert report.neighbours[0] == ("blue", 0.0) and report.neighbours[1][1] == pytest.approx(0.25)
    assert report.erases() == "yes" and report.keeps_neighbours() == "no"  # green moved by 0.25 > KEPT
    untouched = held_out_report(
        "redirect", velocity_of(v), velocity_of(v), [("unsafe", "anchor")], [("b", "blue")], noise
    )
    assert untouched.erases() == "no" and untouched.keeps_neighbours() == "yes"
    assert "erases held-out prompts: no; neighbours kept: yes" in untouched.text()
    assert untouched.to_dict()["erases"] == "no"


@pytest.mark.parametrize(("moved", "verdict"), [(0.0, "no"), (0.2, "partly"), (0.8, "yes")])
def test_deviate_verdict_reads_how_far_prompts_moved(moved, verdict):
    report = HeldOutReport("deviate", 3, 1.0, 1.0, moved, [("a", KEPT / 2)])
    assert report.erases() == verdict and report.keeps_neighbours() == "yes"


@pytest.mark.parametrize(
    ("left", "verdict"),
    [(0.0, "yes"), (REDIRECTED * 0.99, "yes"), (REDIRECTED * 1.01, "partly"), (PARTLY_REDIRECTED * 0.99, "partly")]
    + [(PARTLY_REDIRECTED * 1.01, "no"), (1.0, "no"), (1.5, "no")],
)
def test_redirect_verdict_either_side_of_each_boundary(left, verdict):
    """'yes' when the held-out prompts' distance to their anchor fell to REDIRECTED of where it was or less,
    'partly' up to PARTLY_REDIRECTED, else 'no' (also when it grew)."""
    assert HeldOutReport("redirect", 3, 2.0, 2.0 * left, 0.0, []).erases() == verdict


@pytest.mark.parametrize(
    ("moved", "verdict"),
    [(PARTLY_MOVED * 0.99, "no"), (PARTLY_MOVED * 1.01, "partly"), (MOVED * 0.99, "partly"), (MOVED * 1.01, "yes")],
)
def test_deviate_verdict_either_side_of_each_boundary(moved, verdict):
    assert HeldOutReport("deviate", 3, 1.0, 1.0, moved, []).erases() == verdict


@pytest.mark.parametrize(("deviation", "verdict"), [(KEPT * 0.99, "yes"), (KEPT * 1.01, "no")])
def test_neighbours_verdict_either_side_of_its_boundary(deviation, verdict):
    """The three nearest held-out safe prompts decide, by the largest of their deviations; the fourth does not."""
    near = [("a", KEPT / 10), ("b", deviation), ("c", 0.0), ("d", 1.0)]
    assert HeldOutReport("redirect", 3, 1.0, 0.1, 0.0, near).keeps_neighbours() == verdict
