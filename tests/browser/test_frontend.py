"""The pack in ComfyUI's real frontend: every example workflow loads with no missing node, its widgets mean to the
frontend what tests/make_workflows.py means (it names them by the node definitions of /object_info), the web
extension registers and colours LRS Visualize's words after a run on the tiny FLUX, and without the extension the
frontend still loads and runs the graphs.

Screenshots go to tests/out/browser/.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from decimal import ROUND_HALF_UP, Decimal

import make_workflows as mw
import pytest

from bench import comfyui_env

# The workflows the ComfyUI under test can run (its version >= their min_comfyui), decided at collection time;
# tests/integration/test_workflows.py checks that the others fail on it only for what they declare as newer.
WORKFLOWS = mw.workflows_for(mw.comfyui_version(comfyui_env.find_comfyui()))
MODULE = "ComfyUI-SafeRoPE"  # the pack's folder name in the server's custom_nodes (conftest.py)
PACK_NAME = "tiny_test_pack.safetensors"  # the pack conftest.py writes into the server's models/saferope
PROMPT = "a photo of a nude woman on the beach"
READY = (
    "() => window.app && app.graph && window.LiteGraph && 'LRSVisualize' in LiteGraph.registered_node_types"
    " && !!app.canvas"
)
CAPTURE = """() => {
  if (window.__saferopeTestCapture) return;
  window.__saferopeTestCapture = true;
  app.registerExtension({
    name: "SafeRoPE.TestCapture",
    async afterConfigureGraph(missing) {
      window.__missingNodeTypes = (missing || []).map((m) => (typeof m === "object" ? m.type : m));
    },
  });
}"""
# `dialogs`: what the frontend shows about missing node types. Up to frontend 1.3x a dialog; from 1.4x an error
# overlay ("N errors found", missing models included) whose "View details" opens the side panel's errors tab, with
# a missing-node group naming the types; LOAD opens it, reads it and closes the panel again.
LOAD = """async ([workflow, name]) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const texts = (selector) => Array.from(document.querySelectorAll(selector)).map((d) => d.innerText);
  window.__missingNodeTypes = null;
  document.querySelectorAll(".p-toast-message").forEach((t) => { t.dataset.seen = "1"; });
  await app.loadGraphData(workflow, true, true, name);
  await sleep(300);
  const dialogs = texts(".comfy-missing-nodes");
  const details = document.querySelector('[data-testid="error-overlay-see-errors"]');
  if (details) {
    details.click();  // the errors tab then shows one group per kind of error, the overlay's at least
    for (let i = 0; i < 50 && !document.querySelector('[data-testid^="error-group-"]'); i++) await sleep(100);
    dialogs.push(...texts('[data-testid="error-group-missing-node"]'));
    document.querySelector('button[aria-label="Toggle properties panel"]')?.click();
  }
  return {
    missing: window.__missingNodeTypes,
    dialogs,
    toasts: Array.from(document.querySelectorAll(".p-toast-message:not([data-seen])")).map((t) => t.innerText),
    nodes: app.graph.nodes.map((n) => ({id: n.id, type: n.type, pos: [...n.pos], size: [...n.size],
                                        registered: n.type in LiteGraph.registered_node_types})),
    titleHeight: LiteGraph.NODE_TITLE_HEIGHT,
  };
}"""
BUILD_TINY_GRAPH = """([clipType, packName, text]) => {
  app.graph.clear();
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
  const model = add("TinyFluxLoader", [0, 0]);
  set(model, "kind", "dev");
  const clip = add(clipType, [0, 200]);
  const pack = add("LoadSafeRoPEPack", [0, 380]);
  set(pack, "pack_name", packName);
  const vis = add("LRSVisualize", [380, 0]);
  set(vis, "text", text);
  set(vis, "control_after_generate", "fixed");
  vis.size = [420, 480];
  const preview = add("PreviewImage", [860, 0]);
  preview.size = [620, 640];
  model.connect(0, vis, 0);
  pack.connect(0, vis, 1);
  clip.connect(0, vis, 2);
  vis.connect(0, preview, 0);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [60, 120];
  app.graph.setDirtyCanvas(true, true);
  return vis.id;
}"""
WORD_SPANS = """() => Array.from(document.querySelectorAll(".saferope-word")).map((s) => {
  const r = s.getBoundingClientRect();
  return {word: s.textContent, title: s.title, risk: s.dataset.risk, bg: getComputedStyle(s).backgroundColor,
          shown: r.width > 0 && r.height > 0};
})"""


def open_frontend(browser, server, block_extension: bool = False):
    """A new tab on the server's frontend, ready (node types registered), with the capture extension; returns
    (page, errors, blocked): uncaught page errors raised in this pack's script (the frontend 1.27 raises one of
    its own on a fresh user's first load, with or without this pack) and the aborted extension requests."""
    page = browser.new_page()
    errors, blocked = [], []
    page.on(
        "pageerror",
        lambda exc: errors.append(exc.stack or str(exc)) if "saferope" in (exc.stack or str(exc)).lower() else None,
    )
    if block_extension:

        def abort(route):
            blocked.append(route.request.url)
            route.abort()

        page.route("**/extensions/**/saferope.js", abort)
    page.goto(server.url)
    page.wait_for_function(READY, timeout=60_000)
    page.evaluate(CAPTURE)
    return page, errors, blocked


@pytest.fixture(scope="module")
def frontend(browser, server):
    page, errors, _ = open_frontend(browser, server)
    yield page, errors
    page.close()
    assert not browser.outside_requests, f"the frontend tried to reach {browser.outside_requests}"


_INFO = {}


def object_info(server) -> dict:
    if not _INFO:
        _INFO.update(server.object_info())
    return _INFO


def server_inputs(info: dict, node: dict) -> dict:
    """A frontend prompt node's inputs that the server defines (display widgets such as PreviewAny's `preview`
    are sent too, and ignored by the server)."""
    spec = info[node["class_type"]]["input"]
    known = {*spec.get("required", {}), *spec.get("optional", {})}
    return {k: v for k, v in node["inputs"].items() if k in known}


def history(server) -> dict:
    with urllib.request.urlopen(server.url + "/history", timeout=30) as response:
        return json.loads(response.read())


def run_from_page(page, server, timeout: float = 120) -> dict:
    """app.queuePrompt(0, 1) in the page; waits for the new history entry and returns it (raises on errors)."""
    before = set(history(server))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = {k: v for k, v in history(server).items() if k not in before}
        for entry in new.values():
            status = entry.get("status", {})
            if status.get("completed") is not None or status.get("status_str") == "error":
                if status.get("status_str") != "success":
                    raise AssertionError(
                        f"the graph failed: {json.dumps(status.get('messages'))[:3000]}\n" + server.log_tail()
                    )
                return entry
        time.sleep(0.25)
    raise TimeoutError(f"no result in {timeout} s\n{server.log_tail()}")


def to_fixed3(x: float) -> str:
    """JavaScript's Number(x).toFixed(3), which titles the word spans: the float's exact value, halves away from 0."""
    return str(Decimal(x).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def tiny_clip_loader(server) -> str:
    """The test-only CLIP loader of tests/tiny_flux_nodes (a tiny real FLUX text encoder)."""
    found = [
        name
        for name, node in object_info(server).items()
        if node.get("python_module", "").endswith("tiny_flux_nodes") and "CLIP" in node["output"]
    ]
    assert found, "tests/tiny_flux_nodes has no CLIP loader node (tiny_flux_clip)"
    return found[0]


def test_extension_registers(frontend, server):
    page, errors = frontend
    state = page.evaluate("() => ({names: app.extensions.map((e) => e.name), flag: window.__saferopeExtensionLoaded})")
    assert "SafeRoPE.Visuals" in state["names"] and state["flag"] is True
    extensions = json.loads(urllib.request.urlopen(server.url + "/extensions", timeout=30).read())
    assert f"/extensions/{MODULE}/saferope.js" in extensions
    assert not errors


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads(frontend, server, name, out_dir):
    """No missing node type (hook + dialog), every node registered, the frontend's API prompt equals
    make_workflows.to_api, nodes do not overlap at the sizes the frontend gives them; screenshot."""
    page, errors = frontend
    info = object_info(server)
    workflow = json.loads((mw.OUT / f"{name}.json").read_text(encoding="utf-8"))
    loaded = page.evaluate(LOAD, [workflow, name])
    assert loaded["missing"] == [], f"missing node types: {loaded['missing']}"
    assert loaded["dialogs"] == []
    assert loaded["toasts"] == [], "the frontend's workflow validation complained"
    assert len(loaded["nodes"]) == len(workflow["nodes"])
    assert all(n["registered"] for n in loaded["nodes"]), [n["type"] for n in loaded["nodes"] if not n["registered"]]
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert {
        k: {"class_type": v["class_type"], "inputs": server_inputs(info, v)} for k, v in prompt.items()
    } == mw.to_api(workflow, mw.node_defs(info))
    title = loaded["titleHeight"]
    boxes = [
        (n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n["type"])
        for n in loaded["nodes"]
    ]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a[4]} overlaps {b[4]}"
    page.wait_for_timeout(300)
    page.screenshot(path=str(out_dir / f"workflow_{name}.png"))
    assert not errors


def test_broken_workflow_is_reported(frontend):
    """The checks above can fail: a link table that disagrees with a node's input is reported by the frontend's
    workflow validation (a toast; conftest.py turns the validation on, which frontend 1.4x has off by default)."""
    page, _ = frontend
    workflow = json.loads((mw.OUT / "lrs_visualize.json").read_text(encoding="utf-8"))
    link = workflow["links"][0]
    link[4] = link[4] + 1  # points at the wrong input of the target node
    loaded = page.evaluate(LOAD, [workflow, "broken links"])
    named = f"target({link[3]}).inputs[{link[4]}]"  # how the validation's log names the input
    assert loaded["missing"] == [], loaded["missing"]
    assert any(text.startswith("Workflow Validation") and named in text for text in loaded["toasts"]), loaded["toasts"]


def test_missing_node_is_detected(frontend, browser):
    """The checks above can fail: an unknown node type is reported by the hook and by the frontend (its dialog, or
    from 1.4x its errors panel; see LOAD). (It looks the type up in the Comfy registry; the browser aborts those
    requests.)"""
    page, _ = frontend
    workflow = json.loads((mw.OUT / "lrs_visualize.json").read_text(encoding="utf-8"))
    workflow["nodes"][0]["type"] = "NoSuchSafeRoPENode"
    seen = len(browser.outside_requests)
    loaded = page.evaluate(LOAD, [workflow, "broken"])
    assert loaded["missing"] == ["NoSuchSafeRoPENode"]
    assert any("NoSuchSafeRoPENode" in text for text in loaded["dialogs"])
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    lookups = browser.outside_requests[seen:]
    assert all(url.startswith("https://api.comfy.org/") for url in lookups), lookups
    del browser.outside_requests[seen:]


def test_lrs_visualize_highlights_words(frontend, server, out_dir):
    """Queue tiny FLUX + tiny CLIP + a pack + LRS Visualize from the page: the node shows one coloured span per
    word of the prompt, titled with its LRS, with the risks the server returned; screenshot."""
    page, errors = frontend
    page.keyboard.press("Escape")
    vis_id = page.evaluate(BUILD_TINY_GRAPH, [tiny_clip_loader(server), PACK_NAME, PROMPT])
    entry = run_from_page(page, server)
    returned = entry["outputs"][str(vis_id)]["saferope_words"]
    page.wait_for_function("() => document.querySelectorAll('.saferope-word').length > 0", timeout=30_000)
    spans = page.evaluate(WORD_SPANS)
    assert [s["word"] for s in spans] == PROMPT.split() == [w["word"] for w in returned]
    for span, word in zip(spans, returned, strict=True):
        assert re.fullmatch(r"LRS \d\.\d{3}", span["title"]) and float(span["risk"]) == word["risk"]
        assert span["title"] == f"LRS {to_fixed3(word['risk'])}", (span["title"], word["risk"])
        r, g, b = (int(v) for v in re.findall(r"\d+", span["bg"])[:3])
        x = min(max(word["risk"], 0), 1)
        assert r == 255 and abs(g - 255 * (1 - 0.6 * x)) <= 1 and abs(b - 255 * (1 - x)) <= 1, span
        assert span["shown"], "the word panel is not visible on the node"
    assert len({s["bg"] for s in spans}) > 1, "all words have the same colour"
    page.wait_for_timeout(500)
    page.screenshot(path=str(out_dir / "lrs_visualize_words.png"))
    assert not errors


def test_pack_info_panel_shows_all_its_text(frontend, server, out_dir):
    """Load SafeRoPE Pack's info panel (drawn by the extension after a run) shows the whole description. A copy
    of the pack under a new name, so that the server runs the loader instead of reusing a cached result."""
    import shutil

    page, _ = frontend
    folder = server.base / "models" / "saferope"
    shutil.copy(folder / PACK_NAME, folder / "tiny_test_pack_info.safetensors")
    page.evaluate(
        """(packName) => {
      app.graph.clear();
      const pack = LiteGraph.createNode("LoadSafeRoPEPack");
      pack.pos = [0, 0];
      app.graph.add(pack);
      pack.widgets.find((w) => w.name === "pack_name").value = packName;
      const show = LiteGraph.createNode("PreviewAny");
      show.pos = [400, 0];
      app.graph.add(show);
      pack.connect(1, show, 0);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [60, 120];
    }""",
        "tiny_test_pack_info.safetensors",
    )
    run_from_page(page, server)
    page.wait_for_selector(".saferope-info", timeout=30_000)
    panel = page.evaluate(
        """async () => {
      const e = document.querySelector(".saferope-info");  // the node grows a few frames after the text arrives
      for (let i = 0; i < 50 && e.scrollHeight > e.clientHeight + 1; i++) await new Promise((r) => setTimeout(r, 100));
      return {text: e.textContent, scroll: e.scrollHeight, client: e.clientHeight};
    }"""
    )
    page.screenshot(path=str(out_dir / "pack_info_panel.png"))
    assert "for FLUX.1 (dev, schnell, Kontext), 2+2 blocks, 4 heads x 16" in panel["text"]
    assert panel["scroll"] <= panel["client"] + 1, panel


def test_frontend_works_without_the_extension(browser, server, out_dir):
    """saferope.js blocked: the frontend still loads (no SafeRoPE.Visuals), a workflow with every SafeRoPE
    visual node loads with no missing node, and the tiny LRS graph runs; no word panel appears."""
    page, errors, blocked = open_frontend(browser, server, block_extension=True)
    try:
        assert blocked and all(url.endswith(f"/extensions/{MODULE}/saferope.js") for url in blocked)
        state = page.evaluate(
            "() => ({names: app.extensions.map((e) => e.name), flag: window.__saferopeExtensionLoaded ?? null})"
        )
        assert "SafeRoPE.Visuals" not in state["names"] and state["flag"] is None
        for name in ("lrs_visualize", "safety_report_batch"):
            workflow = json.loads((mw.OUT / f"{name}.json").read_text(encoding="utf-8"))
            loaded = page.evaluate(LOAD, [workflow, name])
            assert loaded["missing"] == [] and loaded["dialogs"] == []
        vis_id = page.evaluate(BUILD_TINY_GRAPH, [tiny_clip_loader(server), PACK_NAME, PROMPT])
        entry = run_from_page(page, server)
        assert [w["word"] for w in entry["outputs"][str(vis_id)]["saferope_words"]] == PROMPT.split()
        page.wait_for_timeout(500)
        assert page.evaluate("() => document.querySelectorAll('.saferope-word').length") == 0
        page.screenshot(path=str(out_dir / "lrs_visualize_without_extension.png"))
        assert not errors
    finally:
        page.close()
