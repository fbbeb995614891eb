"""Browser tier: ComfyUI's real frontend (comfyui-frontend-package, served by a headless ComfyUI on loopback) in a
headless Chromium driven by Playwright. Skipped, with one reason line, when ComfyUI, the `playwright` package or a
Chromium binary is missing.

Setup (Debian): apt-get install -y chromium && python -m pip install playwright
(Playwright drives the system Chromium; `playwright install` is not needed.) $SAFEROPE_CHROMIUM overrides the
binary. The browser reaches nothing but the test server: every other request is aborted and recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
for folder in (TESTS, TESTS.parent):  # tests/ (comfy_server, make_workflows) and the repository (bench.comfyui_env)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

from bench import comfyui_env  # noqa: E402

REPO = comfyui_env.REPO
OUT = TESTS / "out" / "browser"  # screenshots (git-ignored)
MODULE = "ComfyUI-SafeRoPE"  # also in test_frontend.py
PACK_NAME = "tiny_test_pack.safetensors"  # also in test_frontend.py
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# Settings of the fresh ComfyUI user: no first-run template browser, no missing-models dialog (it would fetch
# the download URLs' sizes from the internet), and workflow validation on (frontend 1.4x turned it off by default
# and then repairs a broken link table silently; test_broken_workflow_is_reported needs its toast).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Validation.Workflows": True,
}


def find_chromium() -> str | None:
    env = os.environ.get("SAFEROPE_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


COMFYUI = comfyui_env.find_comfyui()
CHROMIUM = find_chromium()
if COMFYUI is None:
    SKIP_REASON = "browser tier did not run: no ComfyUI checkout (COMFYUI_PATH, ~/ComfyUI)"
elif importlib.util.find_spec("playwright") is None:
    SKIP_REASON = "browser tier did not run: the playwright package is missing (python -m pip install playwright)"
elif CHROMIUM is None:
    SKIP_REASON = "browser tier did not run: no Chromium (apt-get install -y chromium, or set $SAFEROPE_CHROMIUM)"
else:
    SKIP_REASON = None


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON:
        skip = pytest.mark.skip(reason=SKIP_REASON)
        for item in items:
            if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
                item.add_marker(skip)


def write_tiny_pack(path: Path) -> None:
    """A random pack for tiny_flux_nodes' TinyFluxLoader (2 + 2 blocks, 4 heads of 16), rank 2."""
    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from saferope_core import BlockRotation, ModelShape, SafeRoPEPack

    config = comfyui_env.flux_unet_config("dev")
    heads = config["num_heads"]
    shape = ModelShape("flux", config["depth"], config["depth_single_blocks"], heads, config["hidden_size"] // heads)
    g = torch.Generator().manual_seed(0)
    delta = torch.tensor([0.9, 0.6, 0.2, -0.3]).repeat(len(shape.block_names()), 1)
    blocks = {}
    for row, name in enumerate(shape.block_names()):
        bases = [torch.linalg.qr(torch.randn(heads, shape.head_dim, 2, generator=g))[0] for _ in range(2)]
        w = 0.5 * torch.randn(heads, 2, 2, generator=g)
        blocks[name] = BlockRotation(*bases, delta[row] >= 0.5, w, w.clone())
    SafeRoPEPack(shape, ["test"], 2, blocks, delta=delta, name="tiny_test_pack").save(path)


@pytest.fixture(scope="session")
def server():
    """ComfyUI with this pack (as custom_nodes/ComfyUI-SafeRoPE) and the test-only tiny FLUX nodes, a tiny pack
    in models/saferope, and the fresh user's settings."""
    from comfy_server import ComfyServer

    with ComfyServer({MODULE: REPO, "tiny_flux_nodes": REPO / "tests" / "tiny_flux_nodes"}) as srv:
        (srv.base / "models" / "saferope").mkdir(parents=True, exist_ok=True)
        write_tiny_pack(srv.base / "models" / "saferope" / PACK_NAME)
        request = urllib.request.Request(
            srv.url + "/settings", data=json.dumps(SETTINGS).encode(), headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=30).read()
        yield srv


@pytest.fixture(scope="session")
def browser(server, tmp_path_factory):
    """A headless Chromium (fresh user-data-dir) that can reach only the test server."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 2200, "height": 1300},
        )
        context.outside_requests = []

        def block(route):
            context.outside_requests.append(route.request.url)
            route.abort()

        context.route(lambda url: not url.startswith(server.url), block)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="session")
def out_dir() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT
