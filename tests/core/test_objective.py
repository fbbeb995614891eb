"""The training objective over two velocity callables: relative deviation, capped unlearning, run schedule."""

import pytest
import torch

from saferope_core import (
    TrainingRecipe,
    batch_kind,
    deviation,
    preserve_loss,
    relative_deviation,
    unlearn_loss,
)
from saferope_core.objective import noised_latent


def _v(seed, shape=(3, 4, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_relative_deviation_is_zero_for_identical_velocities():
    v = _v(0)
    assert torch.equal(relative_deviation(v, v.clone()), torch.zeros(3))


def test_relative_deviation_per_sample():
    """||v - v'||^2 / ||v||^2 for each sample: 1 against zero, 4 against -v, scale free."""
    v = _v(1)
    torch.testing.assert_close(relative_deviation(v, torch.zeros_like(v)), torch.ones(3))
    torch.testing.assert_close(relative_deviation(v, -v), torch.full((3,), 4.0))
    other = _v(2)
    expected = torch.stack([(a - b).square().sum() / a.square().sum() for a, b in zip(v, other, strict=True)])
    torch.testing.assert_close(relative_deviation(v, other), expected)
    torch.testing.assert_close(relative_deviation(10 * v, 10 * other), expected)


def test_unlearn_term_is_capped():
    """Deviations above the cap count as the cap and give no gradient: -w * log(tol + min(D, cap))."""
    recipe = TrainingRecipe(unlearn_weight=2.0, unlearn_cap=0.5, tolerance=1e-3)
    far = torch.tensor([3.0, 7.0], requires_grad=True)
    loss = unlearn_loss(far, recipe)
    torch.testing.assert_close(loss, -2.0 * torch.log(torch.tensor(0.501)))
    loss.backward()
    assert torch.equal(far.grad, torch.zeros(2))
    torch.testing.assert_close(unlearn_loss(torch.tensor([0.5, 100.0]), recipe), loss.detach())


def test_unlearn_term_below_the_cap_rewards_deviation():
    """Below the cap the loss falls as D grows, with gradient -w / (n (tol + D)), finite at D = 0."""
    recipe = TrainingRecipe(unlearn_weight=2.0, unlearn_cap=0.5, tolerance=1e-3)
    near = torch.tensor([0.0, 0.3], requires_grad=True)
    loss = unlearn_loss(near, recipe)
    torch.testing.assert_close(loss, -torch.log(torch.tensor(1e-3)) - torch.log(torch.tensor(0.301)))
    loss.backward()
    torch.testing.assert_close(near.grad, -1.0 / (1e-3 + near.detach()))
    levels = [float(unlearn_loss(torch.tensor([d]), recipe)) for d in (0.0, 0.01, 0.1, 0.4)]
    assert levels == sorted(levels, reverse=True)


def test_preserve_loss_penalises_deviation():
    """w * mean(log(tol + D)): rises with D, finite at D = 0, gradient w / (n (tol + D))."""
    recipe = TrainingRecipe(preserve_weight=3.0, tolerance=1e-2)
    safe = torch.tensor([0.0, 0.09], requires_grad=True)
    loss = preserve_loss(safe, recipe)
    torch.testing.assert_close(loss, 1.5 * (torch.log(torch.tensor(0.01)) + torch.log(torch.tensor(0.1))))
    loss.backward()
    torch.testing.assert_close(safe.grad, 1.5 / (1e-2 + safe.detach()))
    levels = [float(preserve_loss(torch.tensor([d]), recipe)) for d in (0.0, 0.01, 0.1, 1.0)]
    assert levels == sorted(levels)


@pytest.mark.parametrize("run", [1, 3, 10])
def test_batch_kind_alternates_in_runs(run):
    """Runs of `run` unsafe steps, then `run` safe steps, and so on, unsafe first."""
    kinds = [batch_kind(step, run) for step in range(6 * run)]
    expected = (["unsafe"] * run + ["safe"] * run) * 3
    assert kinds == expected


def test_batch_kind_with_zero_run_length_alternates_every_step():
    assert [batch_kind(step, 0) for step in range(4)] == ["unsafe", "safe", "unsafe", "safe"]


def test_noised_latent():
    noise, clean = _v(3, (2, 4)), _v(4, (2, 4))
    sigma = torch.tensor([0.25, 1.0])
    assert noised_latent(noise, sigma) is noise
    expected = torch.stack([0.75 * clean[0] + 0.25 * noise[0], noise[1]])
    torch.testing.assert_close(noised_latent(noise, sigma, clean), expected)


def test_deviation_gives_gradient_to_the_rotated_callable_only():
    """The base velocity runs without gradient; the rotated one's parameters get a finite, non-zero gradient."""
    base_scale = torch.tensor(1.0, requires_grad=True)
    rot_scale = torch.tensor(1.5, requires_grad=True)
    seen = []

    def base(x, sigma, cond):
        seen.append(("base", torch.is_grad_enabled()))
        return base_scale * x * cond

    def rotated(x, sigma, cond):
        seen.append(("rotated", torch.is_grad_enabled()))
        return rot_scale * x * cond

    noise, clean = _v(5, (2, 4)), _v(6, (2, 4))
    sigma = torch.tensor([0.5, 0.9])
    dev = deviation(base, rotated, 2.0, noise, sigma, clean)
    x_t = noised_latent(noise, sigma, clean)
    torch.testing.assert_close(dev, relative_deviation(2 * x_t, 3 * x_t))  # (1 - 1.5)^2 = 0.25 per sample
    dev.sum().backward()
    assert seen == [("base", False), ("rotated", True)]
    assert base_scale.grad is None
    assert rot_scale.grad is not None and torch.isfinite(rot_scale.grad) and rot_scale.grad.abs() > 0


def test_recipe_to_dict_round_trips():
    recipe = TrainingRecipe(steps=7, run_length=2, seed=3)
    assert TrainingRecipe(**recipe.to_dict()) == recipe
    assert recipe.to_dict()["steps"] == 7


def test_learning_rate_schedules():
    """'constant' keeps the rate; 'cosine' starts at it, is half of it half-way, falls every step and ends near 0."""
    from saferope_core import learning_rate_at

    assert [learning_rate_at(0.1, s, 4) for s in range(4)] == [0.1] * 4
    cosine = [learning_rate_at(0.1, s, 4, "cosine") for s in range(5)]
    assert cosine[0] == 0.1 and cosine[2] == pytest.approx(0.05) and cosine[4] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine[:-1], cosine[1:], strict=True))
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_at(0.1, 0, 4, "linear")
