"""Smoke tests of the ComfyUI-tier harness: tiny FLUX models in process, comfy.sample, and a real headless server
running a graph with the test-only tiny_flux_nodes."""

import sys

import pytest
import torch

from bench import comfyui_env


@pytest.fixture(scope="module", autouse=True)
def _comfy(comfy):
    return comfy


@pytest.mark.parametrize("kind", comfyui_env.KINDS)
def test_tiny_models_run(kind):
    patcher = comfyui_env.tiny_flux(kind, seed=1)
    assert patcher.model.diffusion_model.params.guidance_embed == (kind != "schnell")
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 16, 8, 6, generator=g)
    context, pooled = comfyui_env.encode_text("a red fox in the snow")
    context, pooled = context.expand(2, -1, -1), pooled.expand(2, -1)
    refs = {}
    if kind == "kontext":  # one reference image, of another size than the latent
        refs = {"ref_latents": [torch.randn(1, 16, 6, 8, generator=g)], "ref_latents_method": "index"}
    with torch.no_grad():
        out = comfyui_env.run_model(patcher, latent, 0.7, context, pooled, **refs)
        again = comfyui_env.run_model(comfyui_env.tiny_flux(kind, seed=1), latent, 0.7, context, pooled, **refs)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert torch.equal(out, again)  # deterministic construction
    assert (out - latent).abs().mean() > 1e-3  # the model does something


def test_wrappers_reach_the_model():
    """A DIFFUSION_MODEL wrapper added on a clone sees the call through run_model, the original does not."""
    import comfy.patcher_extension

    patcher = comfyui_env.tiny_flux("dev")
    seen = []

    def wrapper(executor, x, timestep, context, *args, **kwargs):
        seen.append(context.shape[1])
        return executor(x, timestep, context, *args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "smoke", wrapper)
    context, pooled = comfyui_env.encode_text("three word prompt")
    latent = torch.zeros(1, 16, 4, 4)
    with torch.no_grad():
        comfyui_env.run_model(patcher, latent, 0.5, context, pooled)
        assert seen == []
        comfyui_env.run_model(clone, latent, 0.5, context, pooled)
    assert seen == [3]


def test_weight_patches_apply_and_come_off():
    """run_model loads the patcher it is given: a clone's weight patch changes the output, the original is back
    to its own weights afterwards."""
    patcher = comfyui_env.tiny_flux("dev")
    context, pooled = comfyui_env.encode_text("a fox")
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    key = "diffusion_model.img_in.weight"
    clone = patcher.clone()
    clone.add_patches({key: (torch.ones_like(patcher.model.state_dict()[key]),)}, 0.1)
    with torch.no_grad():
        before = comfyui_env.run_model(patcher, latent, 0.5, context, pooled)
        patched = comfyui_env.run_model(clone, latent, 0.5, context, pooled)
        after = comfyui_env.run_model(patcher, latent, 0.5, context, pooled)
    assert not torch.allclose(before, patched) and torch.equal(before, after)


def test_encode_text_is_per_word():
    a, pa = comfyui_env.encode_text("cat on a mat")
    b, _ = comfyui_env.encode_text("a cat")
    assert a.shape == (1, 4, comfyui_env.CONTEXT_DIM) and pa.shape == (1, comfyui_env.POOLED_DIM)
    assert torch.equal(a[0, 0], b[0, 1]) and torch.equal(a[0, 2], b[0, 0])
    assert not torch.equal(a, comfyui_env.encode_text("cat on a mat", seed=1)[0])


@pytest.mark.parametrize("kind, cfg", [("dev", 1.0), ("schnell", 2.0)])
def test_sample(kind, cfg):
    patcher = comfyui_env.tiny_flux(kind)
    out = comfyui_env.sample(patcher, "a red fox", "blurry", width=64, height=48, steps=2, cfg=cfg, seed=3)
    assert out.shape == (1, 16, 6, 8) and torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert torch.equal(
        out, comfyui_env.sample(patcher, "a red fox", "blurry", width=64, height=48, steps=2, cfg=cfg, seed=3)
    )


def test_sample_kontext_reference():
    patcher = comfyui_env.tiny_flux("kontext")
    ref = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = comfyui_env.sample(patcher, "a red fox", steps=2)
    with_ref = comfyui_env.sample(patcher, comfyui_env.conditioning("a red fox", reference_latents=[ref]), steps=2)
    assert with_ref.shape == plain.shape and torch.isfinite(with_ref).all()
    assert not torch.allclose(with_ref, plain)


def test_pack_imports_in_process():
    """The pack loads as a package, as ComfyUI loads it: its `nodes` is not ComfyUI's top-level `nodes`."""
    pack = comfyui_env.import_pack()
    assert callable(pack.comfy_entrypoint) and "comfyui_saferope.nodes" in sys.modules


def test_server_runs_a_graph(comfy):
    from safetensors.torch import load_file

    from comfy_server import ComfyServer

    graph = {
        "1": {"class_type": "TinyFluxLoader", "inputs": {"kind": "dev", "seed": 0}},
        "2": {"class_type": "TinyFluxConditioning", "inputs": {"text": "a red fox in the snow", "seed": 0}},
        "3": {"class_type": "TinyFluxConditioning", "inputs": {"text": "", "seed": 0}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "smoke/tiny"}},
    }
    with ComfyServer([comfyui_env.REPO / "tests" / "tiny_flux_nodes"]) as server:
        info = server.object_info()
        assert {"TinyFluxLoader", "TinyFluxConditioning", "KSampler", "SaveLatent"} <= info.keys()
        kinds = [k for k in comfyui_env.ALL_KINDS if comfyui_env.kind_supported(k)]  # this server's ComfyUI
        assert info["TinyFluxLoader"]["input"]["required"]["kind"][0] == kinds
        entry = server.run(graph, timeout=120)
        saved = entry["outputs"]["6"]["latents"][0]
        latent = load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]
    assert latent.shape == (1, 16, 8, 8) and torch.isfinite(latent).all() and latent.abs().mean() > 1e-3


def test_a_skip_fails_where_a_comfyui_is_present(tmp_path):
    """tests/conftest.py: with a ComfyUI present, a skipped test of the ComfyUI tier fails under plain `python -m
    pytest` too (no environment variable needed); a skipped core test stays a skip."""
    import os
    import subprocess

    (tmp_path / "force_skip.py").write_text(
        "import pytest\n\n\ndef pytest_collection_modifyitems(items):\n"
        "    for item in items:\n        item.add_marker(pytest.mark.skip(reason='forced by the test'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def run(test):
        cmd = [sys.executable, "-m", "pytest", test, "-p", "force_skip", "-p", "no:cacheprovider", "-q"]
        return subprocess.run(cmd, cwd=comfyui_env.REPO, env=env, capture_output=True, text=True, timeout=300)

    tier = run("tests/integration/test_families.py::test_this_comfyui_builds_what_it_should")
    assert tier.returncode == 1 and "skipped although a ComfyUI is present" in tier.stdout, tier.stdout[-2000:]
    core = run("tests/core/test_pack.py::test_valid_file_loads")
    assert core.returncode == 0 and "1 skipped" in core.stdout, core.stdout[-2000:]


def test_tiny_models_have_the_norm_weights_of_a_trained_model():
    """ComfyUI creates weights empty (0.33's torch RMSNorm QK norms start random, std ~0.016, which shrinks q/k to
    near zero): every normalisation layer of every tiny model has weight 1 and bias 0, as a trained FLUX has."""
    kinds = [k for k in comfyui_env.ALL_KINDS if comfyui_env.kind_supported(k)]
    for kind in kinds:
        model = comfyui_env.tiny_flux(kind, seed=1).model.diffusion_model
        norms = [(name, m) for name, m in model.named_modules() if comfyui_env.is_norm(m)]
        assert any(name.endswith("query_norm") for name, _ in norms), kind  # the QK norms are among them
        for name, module in norms:
            for pname, p in module.named_parameters(recurse=False):
                want = 0.0 if pname == "bias" else 1.0
                assert torch.all(p == want), f"{kind}: {name}.{pname} is not {want}"
