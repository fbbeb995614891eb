"""The prompt redirector's model (detector + token-wise redirector) and its file format."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saferope_core.files import METADATA_KEY, content_hash
from saferope_core.redirector import PromptRedirector, Redirection, RedirectorConfig, RedirectorError

CONFIG = RedirectorConfig("flux", width=48, latent_channels=16, hidden=32, rank=4)


def inputs(batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, length, CONFIG.width, generator=g),
        torch.randn(batch, CONFIG.latent_channels, 4, 4, generator=g),
        torch.rand(batch, generator=g),
    )


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PromptRedirector(CONFIG)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"family": "sdxl"}, "family"),
        ({"width": 0}, "width"),
        ({"rank": 2.5}, "rank"),
        ({"hidden": 30}, "hidden"),
        ({"detector": "latent"}, "detector"),
    ],
)
def test_unusable_configs_are_refused(change, word):
    with pytest.raises(ValueError, match=word):
        PromptRedirector(RedirectorConfig(**{**CONFIG.__dict__, **change}))


def test_shapes_follow_the_model_not_a_constant():
    for width, channels in ((48, 16), (64, 128)):
        m = PromptRedirector(RedirectorConfig("flux2", width, channels, hidden=32, rank=4))
        context = torch.randn(3, 5, width, dtype=torch.bfloat16)
        logit = m.unsafe_logit(context, torch.randn(3, channels, 2, 2), torch.rand(3))
        assert logit.shape == (3,)
        out = m.redirect(context)
        assert out.shape == context.shape and out.dtype == torch.bfloat16


def test_fused_detector_reads_latent_and_noise_level_text_detector_does_not():
    context, latent, sigma = inputs()
    for detector, reads_state in (("fused", True), ("text", False)):
        torch.manual_seed(0)
        m = PromptRedirector(RedirectorConfig(**{**CONFIG.__dict__, "detector": detector}))
        with torch.no_grad():
            before = m.unsafe_logit(context, latent, sigma)
            other_latent = m.unsafe_logit(context, latent + torch.randn_like(latent), sigma)
            other_sigma = m.unsafe_logit(context, latent, 1 - sigma)
            other_text = m.unsafe_logit(context + torch.randn_like(context), latent, sigma)
        assert not torch.equal(before, other_text)
        assert torch.equal(before, other_latent) != reads_state
        assert torch.equal(before, other_sigma) != reads_state


def test_tokens_with_mask_zero_are_unchanged_exactly(model):
    context, _, _ = inputs()
    with torch.no_grad():
        model.mask.bias.fill_(-1e4)  # sigmoid -> exactly 0
        assert torch.equal(model.redirect(context), context)
        model.mask.bias.fill_(0.0)
        assert not torch.equal(model.redirect(context), context)
        assert torch.equal(model.redirect(context, strength=0.0), context)


def test_detection_ignores_padding_and_other_samples(model):
    context, latent, sigma = inputs()
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, 5:] = False
    with torch.no_grad():
        before = model.unsafe_logit(context, latent, sigma, valid)
        changed = context.clone()
        changed[:, 5:] = 10 * torch.randn(2, 2, CONFIG.width)  # padding tokens only
        changed_sample = context.clone()
        changed_sample[1] = torch.randn(7, CONFIG.width)  # the other sample
        assert torch.allclose(model.unsafe_logit(changed, latent, sigma, valid), before, atol=1e-6)
        assert torch.allclose(model.unsafe_logit(changed_sample, latent, sigma, valid)[0], before[0], atol=1e-6)
        assert not torch.allclose(model.unsafe_logit(changed_sample, latent, sigma, valid)[1], before[1])
        # the latent and the noise level are part of the decision, not only the text
        assert not torch.allclose(model.unsafe_logit(context, latent * 3, sigma, valid), before)
        assert not torch.allclose(model.unsafe_logit(context, latent, 1 - sigma, valid), before)


def test_save_and_load_give_the_same_redirector(model, tmp_path):
    path = tmp_path / "r.safetensors"
    model.save(path, "nudity", {"steps": 3})
    loaded, meta = PromptRedirector.load(path)
    assert meta["concept"] == "nudity" and meta["config"]["width"] == CONFIG.width
    context, latent, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.unsafe_logit(context, latent, sigma), model.unsafe_logit(context, latent, sigma))
        assert torch.equal(loaded.redirect(context), model.redirect(context))


def rewrite(path, tensors=None, meta_change=None, rehash=True):
    """Rewrite a saved redirector with changed tensors or metadata (re-hashed like a careful forger, or not)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    meta.update(meta_change or {})
    if rehash:
        meta["content_hash"] = content_hash(data, meta)
    save_file(data, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def test_a_file_from_before_the_detector_field_loads_as_fused(model, tmp_path):
    path = tmp_path / "r.safetensors"
    model.save(path, "nudity", {})
    rewrite(path, meta_change={"config": {k: v for k, v in CONFIG.__dict__.items() if k != "detector"}})
    loaded, _ = PromptRedirector.load(path)
    assert loaded.config.detector == "fused"
    context, latent, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.unsafe_logit(context, latent, sigma), model.unsafe_logit(context, latent, sigma))


@pytest.mark.parametrize(
    ("tensors", "meta", "rehash", "words"),
    [
        ({"scale.bias": torch.ones(1)}, None, False, "content hash"),
        ({"scale.bias": torch.tensor([float("nan")])}, None, True, "NaN"),
        ({"scale.bias": torch.ones(2)}, None, True, "do not match"),
        (None, {"config": {**CONFIG.__dict__, "width": 64}}, True, "do not match"),
        (None, {"config": {**CONFIG.__dict__, "family": "sd15"}}, True, "unusable config"),
        (None, {"kind": "saferope.pack"}, True, "not a prompt redirector"),
    ],
)
def test_damaged_or_foreign_files_are_refused(model, tmp_path, tensors, meta, rehash, words):
    path = tmp_path / "r.safetensors"
    model.save(path, "nudity", {})
    rewrite(path, tensors, meta, rehash)
    with pytest.raises(RedirectorError, match=words):
        PromptRedirector.load(path)


def test_redirection_is_identity_when_nothing_is_flagged(model):
    context, latent, sigma = inputs()
    out, flagged = Redirection(model, threshold=1e9)(["a", "b"], context, latent, sigma)
    assert out is context and not flagged.any()


def test_redirection_decides_per_sample(model):
    context, latent, sigma = inputs()
    with torch.no_grad():
        logits = model.unsafe_logit(context, latent, sigma)
    threshold = float(logits.mean())  # exactly one of the two samples is above it
    out, flagged = Redirection(model, threshold=threshold)(["a", "b"], context, latent, sigma)
    unsafe, safe = int(logits.argmax()), int(logits.argmin())
    assert flagged.tolist() == [i == unsafe for i in range(2)]
    assert torch.equal(out[safe], context[safe])  # the other sample: bit-identical
    with torch.no_grad():
        assert torch.equal(out[unsafe], model.redirect(context)[unsafe])


def test_redirected_samples_stay_redirected_for_the_cooldown(model):
    context, latent, sigma = inputs(batch=1)
    redirection = Redirection(model, threshold=-1e9, cooldown=2)
    assert redirection(["a"], context, latent, sigma)[1].item()  # flagged
    redirection.threshold = 1e9  # the detector now says "safe" every time
    held = [redirection(["a"], context, latent, sigma)[1].item() for _ in range(3)]
    assert held == [True, True, False]  # two more calls redirected, then the detector decides again
    assert not redirection(["b"], context, latent, sigma)[1].item()  # another sample has its own count
