"""Build your own pack in a real headless ComfyUI server, as ONE API-format graph (one server start): Tiny FLUX
Loader + Tiny FLUX CLIP Loader -> SafeRoPE Prompt Set -> Collect Q/K -> Build Subspaces -> Train Risk Rotations ->
Save SafeRoPE Pack. The pack file must land in the server's models/saferope and load."""

from bench import comfyui_env

STEPS = 4


def build_pack_graph(name: str) -> dict:
    """The Collect & Train chain of the README's 'Build your own pack', small enough for a CPU.

    hds_threshold -1.0 keeps every head: a random model holds no concept, so no head is safety-critical at the
    default 0.5 and Build Subspaces would (rightly) refuse; this test checks the chain, not head selection.
    """
    return {
        "1": {"class_type": "TinyFluxLoader", "inputs": {"kind": "dev", "seed": 0}},
        "2": {"class_type": "TinyFluxClipLoader", "inputs": {"seed": 0}},
        "3": {
            "class_type": "SafeRoPEPromptSet",
            "inputs": {
                "concept": "nudity",
                "subjects": "",
                "modifiers": "",
                "templates": "",
                "safe_prompts": "",
                "max_unsafe": 6,
                "max_safe": 6,
                "seed": 0,
            },
        },
        "4": {
            "class_type": "CollectQK",
            "inputs": {
                "model": ["1", 0],
                "clip": ["2", 0],
                "prompts": ["3", 0],
                "sigmas": "1.0, 0.6",
                "width": 64,
                "height": 64,
                "seed": 0,
                "reservoir_size": 64,
            },
        },
        "5": {
            "class_type": "BuildSubspaces",
            "inputs": {"statistics": ["4", 0], "rank": 2, "lrs_threshold": 0.7, "hds_threshold": -1.0},
        },
        "6": {
            "class_type": "TrainRiskRotations",
            "inputs": {
                "model": ["1", 0],
                "clip": ["2", 0],
                "subspaces": ["5", 0],
                "prompts": ["3", 0],
                "steps": STEPS,
                "learning_rate": 0.01,
                "unlearn_weight": 1.0,
                "preserve_weight": 1.0,
                "seed": 0,
                "width": 64,
                "height": 64,
                "run_name": name,
                "checkpoint_every": 2,
                "resume": True,
                "gradient_checkpointing": True,
            },
        },
        "7": {"class_type": "SaveSafeRoPEPack", "inputs": {"pack": ["6", 0], "name": name, "overwrite": False}},
    }


def test_build_pack_graph_in_a_server(pack):
    """The whole chain runs in ComfyUI's executor (inference mode, real node validation) and writes a trained,
    valid pack for the tiny FLUX's shape, plus the training checkpoint."""
    from comfy_server import ComfyServer

    nodes = {"ComfyUI-SafeRoPE": comfyui_env.REPO, "tiny_flux_nodes": comfyui_env.REPO / "tests" / "tiny_flux_nodes"}
    with ComfyServer(nodes) as server:
        info = server.object_info()
        assert {
            "TinyFluxClipLoader",
            "SafeRoPEPromptSet",
            "CollectQK",
            "BuildSubspaces",
            "TrainRiskRotations",
            "SaveSafeRoPEPack",
        } <= info.keys()
        entry = server.run(build_pack_graph("server_pack"), timeout=240)
        models = server.base / "models"
        path = models / "saferope" / "server_pack.safetensors"
        assert path.is_file(), sorted(str(p.relative_to(models)) for p in models.rglob("*"))
        assert (models / "saferope_training" / "server_pack.safetensors").is_file()
        assert entry["outputs"]["7"]["text"] == [f"saved {path}"]
        loaded = pack.saferope_core.load_pack(path)

    tiny = pack.saferope_core.ModelShape("flux", 2, 2, 4, 16)  # what TinyFluxLoader builds
    assert loaded.shape == tiny and loaded.rank == 2 and loaded.concepts == ["nudity"]
    assert loaded.heads_rotated() == 16  # hds_threshold -1: every head of every block
    assert loaded.recipe["trained"] is True and loaded.recipe["steps"] == STEPS
    assert any(bool(b.w_txt.abs().sum() > 0) for b in loaded.blocks.values())
