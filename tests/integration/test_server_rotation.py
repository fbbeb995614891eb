"""Load SafeRoPE Pack -> Apply Risk Rotation in a real headless ComfyUI server (one start): this repository as
the custom node folder ComfyUI-SafeRoPE, the tiny FLUX test nodes, packs in the server's models/saferope."""

import pytest
import torch

from bench import comfyui_env

TINY_SHAPE = {"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": 4, "head_dim": 16}  # TinyFluxLoader


def write_pack(pack, path, shape=TINY_SHAPE, seed=0, rank=3):
    """A seeded pack with random bases and W on some heads of three blocks, saved to `path`."""
    core = pack.saferope_core
    shape = core.ModelShape(**shape)
    g = torch.Generator().manual_seed(seed)
    h, d = shape.heads, shape.head_dim

    def bases():
        return torch.linalg.qr(torch.randn(h, d, rank, generator=g))[0].contiguous()

    masks = {"double.0": [1, 0, 1, 0], "double.1": [0, 1, 1, 0], "single.1": [1, 1, 0, 1]}
    blocks = {
        name: core.BlockRotation(
            bases(),
            bases(),
            torch.tensor(mask[:h] + [0] * (h - 4), dtype=torch.bool),
            2 * torch.randn(h, rank, rank, generator=g),
            2 * torch.randn(h, rank, rank, generator=g),
        )
        for name, mask in masks.items()
    }
    return core.SafeRoPEPack(shape, ["planted"], rank, blocks).save(path)


def graph(pack_name=None, prefix="plain"):
    """TinyFluxLoader -> [Load SafeRoPE Pack -> Apply Risk Rotation] -> KSampler (CFG 2) -> SaveLatent."""
    g = {
        "1": {"class_type": "TinyFluxLoader", "inputs": {"kind": "dev", "seed": 0}},
        "2": {"class_type": "TinyFluxConditioning", "inputs": {"text": "a red fox in the snow", "seed": 0}},
        "3": {"class_type": "TinyFluxConditioning", "inputs": {"text": "blurry", "seed": 0}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"rotation/{prefix}"}},
    }
    if pack_name is not None:
        g["7"] = {"class_type": "LoadSafeRoPEPack", "inputs": {"pack_name": pack_name}}
        g["8"] = {
            "class_type": "ApplyRiskRotation",
            "inputs": {"model": ["1", 0], "pack": ["7", 0], "strength": 1.0, "apply_to": "both"},
        }
        g["5"]["inputs"]["model"] = ["8", 0]
    return g


def saved_latent(server, entry):
    from safetensors.torch import load_file

    saved = entry["outputs"]["6"]["latents"][0]
    return load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"]


def execution_error(server, graph_):
    """Run a graph that must fail; returns the execution_error message of its history entry."""
    entry = server.wait(server.post_prompt(graph_), timeout=120)
    status = entry["status"]
    assert status["status_str"] == "error", status
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, status
    return errors[0]


@pytest.fixture(scope="module")
def server(pack):
    from comfy_server import ComfyServer

    nodes = {"ComfyUI-SafeRoPE": comfyui_env.REPO, "tiny_flux_nodes": comfyui_env.REPO / "tests" / "tiny_flux_nodes"}
    with ComfyServer(nodes) as running:
        yield running


def test_nodes_are_registered(server):
    """The pack's nodes are served with their display names and the saferope folder as the pack list."""
    info = server.object_info()
    assert info["LoadSafeRoPEPack"]["display_name"] == "Load SafeRoPE Pack"
    assert info["ApplyRiskRotation"]["display_name"] == "Apply Risk Rotation"
    assert comfyui_env.combo_options(info["ApplyRiskRotation"]["input"]["required"]["apply_to"]) == [
        "both",
        "text",
        "image",
    ]
    assert not [line for line in server.log().splitlines() if "IMPORT FAILED" in line and "SafeRoPE" in line]


def test_graph_with_apply_risk_rotation(pack, server):
    """A planted pack in models/saferope changes the sampled latent; the same graph without Apply does not
    (and the cached base model is unchanged by the patched branch); the info text names the pack."""
    write_pack(pack, server.base / "models" / "saferope" / "planted.safetensors")
    patched = server.run(graph("planted.safetensors", "patched"), timeout=120)
    plain = server.run(graph(None, "plain"), timeout=120)
    rotated, reference = saved_latent(server, patched), saved_latent(server, plain)
    assert rotated.shape == reference.shape == (1, 16, 6, 8)
    assert torch.isfinite(rotated).all() and (rotated - reference).abs().max() > 1e-4
    info = patched["outputs"]["7"]["text"][0]
    assert "planted" in info and "rank 3" in info and "7 heads in 3 blocks" in info
    again = server.run(graph(None, "plain_again"), timeout=120)
    assert torch.equal(saved_latent(server, again), reference)


def test_graph_errors_name_node_and_problem(pack, server):
    """A corrupt pack file fails on Load SafeRoPE Pack, a pack for another model on Apply Risk Rotation."""
    folder = server.base / "models" / "saferope"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file \xff" * 4)
    error = execution_error(server, graph("corrupt.safetensors", "corrupt"))
    assert error["node_type"] == "LoadSafeRoPEPack" and error["node_id"] == "7"
    assert error["exception_message"].startswith("Load SafeRoPE Pack, input 'pack_name'")
    assert "corrupt.safetensors is not a readable safetensors file" in error["exception_message"]

    write_pack(pack, folder / "wide.safetensors", shape={**TINY_SHAPE, "heads": 8})
    error = execution_error(server, graph("wide.safetensors", "wide"))
    assert error["node_type"] == "ApplyRiskRotation"
    assert error["exception_message"].startswith("Apply Risk Rotation, input 'pack'")
    assert "heads: 8 here, 4 in the model" in error["exception_message"]
