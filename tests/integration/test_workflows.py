"""The example workflows in workflows/ against a live ComfyUI with this pack: every node type exists, widget values
fit the node's inputs in the frontend's order, links join matching types, required inputs are linked, model files
come with a download source, the server accepts each graph as a prompt, and ComfyUI serves them as templates with
their thumbnails. Also: the committed files are what tests/make_workflows.py generates from this server's node
definitions (make_workflows.node_defs of its /object_info: the same frontend_view these checks use).

Each workflow records the oldest ComfyUI it needs (extra.saferope.min_comfyui). The checks against the server run on
the workflows the ComfyUI under test can run (decided at collection time from its comfyui_version.py), and so does
the comparison with the generator (the others cannot be built from its node definitions); the checks of the files
alone run on all of them; test_needs_newer_comfyui_is_exact checks, on a ComfyUI older than a workflow needs, that
what that ComfyUI lacks is exactly what the workflow declares, and that the generator refuses to build it there.
"""

from __future__ import annotations

import io
import json
import urllib.request

import make_workflows as mw
import pytest

from bench import comfyui_env

MODULE = mw.MODULE  # the pack's folder name in custom_nodes, as a user clones it
ALL_WORKFLOWS = sorted(p.stem for p in mw.OUT.glob("*.json"))
COMFYUI_VERSION = mw.comfyui_version(comfyui_env.find_comfyui())  # the ComfyUI under test (None: the tier is skipped)
WORKFLOWS = mw.workflows_for(COMFYUI_VERSION)  # those it can run: min_comfyui <= its version
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FILE_LOADERS = {type_ for type_, _ in mw.FILE_WIDGETS}  # node types with a widget that names a file


def load(name: str) -> dict:
    return json.loads((mw.OUT / f"{name}.json").read_text(encoding="utf-8"))


def get(server, path: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")


@pytest.fixture(scope="module")
def server(pack):
    """One ComfyUI with the pack (as custom_nodes/ComfyUI-SafeRoPE); the files the workflows name are put where
    the loaders look, so file combos are checked too: empty model files, packs, safety packs, UVR anchors and
    redirector files that say their kind in the pack's metadata but hold no tensors (each loader lists only files of
    its kind; packs and safety packs share models/saferope), a real small input image."""
    from PIL import Image
    from safetensors.torch import save_file

    from comfy_server import ComfyServer

    kinds = {  # the kind of the file each loader of a made file (make_workflows.MADE_FOLDERS) lists
        ("LoadSafeRoPEPack", "pack_name"): pack.saferope_core.pack.PACK_KIND,
        ("LoadSafetyPack", "name"): pack.saferope_core.safety_pack.SAFETY_PACK_KIND,
        ("LoadUVRAnchors", "name"): pack.saferope_core.uvr.ANCHORS_KIND,
        ("LoadPromptRedirector", "name"): pack.saferope_core.redirector.REDIRECTOR_KIND,
    }
    assert set(kinds) == {key for key, folder in mw.FILE_WIDGETS.items() if folder in mw.MADE_FOLDERS}

    with ComfyServer({MODULE: comfyui_env.REPO}) as srv:
        defs = mw.node_defs(srv.object_info())
        for name in ALL_WORKFLOWS:
            for node in load(name)["nodes"]:
                if node["type"] not in FILE_LOADERS:
                    continue
                for widget, value in mw.named_widgets(node, defs).items():
                    folder = mw.FILE_WIDGETS.get((node["type"], widget))
                    if folder is None:
                        continue
                    path = srv.base / ("input" if folder == "input" else f"models/{folder}") / value
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if folder == "input":
                        Image.new("RGB", (64, 48), (90, 140, 200)).save(path)
                    elif folder in mw.MADE_FOLDERS:
                        kind = kinds[(node["type"], widget)]
                        metadata = {pack.saferope_core.files.METADATA_KEY: json.dumps({"kind": kind})}
                        save_file({}, str(path), metadata=metadata)
                    else:
                        path.write_bytes(b"")
        srv.info = srv.object_info()
        srv.defs = mw.node_defs(srv.info)  # what the frontend builds: make_workflows generates from the same
        yield srv


def test_every_workflow_is_generated():
    assert ALL_WORKFLOWS == sorted(mw.BUILDERS), "workflows/ and tests/make_workflows.py disagree on the set"
    assert set(ALL_WORKFLOWS) >= {
        "flux1_dev_text_to_image_with_pack",
        "flux1_schnell_text_to_image_with_pack",
        "flux1_dev_text_to_image_with_uvr",
        "flux1_kontext_edit_with_pack",
        "build_a_pack",
        "lrs_visualize",
        "safety_report_batch",
        "flux2_text_to_image_with_pack",
        "flux2_edit_with_pack_and_uvr",
        "chroma_text_to_image_with_pack",
    }
    assert COMFYUI_VERSION is not None, "the ComfyUI under test has no comfyui_version.py"
    assert set(WORKFLOWS) >= {n for n in ALL_WORKFLOWS if mw.min_comfyui(n) == mw.PACK_MIN_COMFYUI}


def without_added_outputs(fresh: dict, committed: dict) -> dict:
    """`fresh` with each node's outputs cut to those of the committed node where this ComfyUI only added unlinked
    outputs after them (0.33 gave Preview Image and Preview Any an output; the frontend adds it on load)."""
    saved = {node["id"]: node for node in committed["nodes"]}
    for node in fresh["nodes"]:
        before = saved.get(node["id"], {}).get("outputs")
        if before is None or len(node["outputs"]) <= len(before):
            continue
        added = node["outputs"][len(before) :]
        if node["outputs"][: len(before)] == before and not any(o.get("links") for o in added):
            node["outputs"] = before
    return fresh


@pytest.mark.parametrize("name", WORKFLOWS)
def test_committed_files_are_generated(server, name):
    """workflows/<name>.json is byte-identical to what the generator builds from this server's node definitions
    (but outputs a newer ComfyUI added); the thumbnail is the same picture (compared by pixels on the generating
    ComfyUI: JPEG bytes may differ between Pillow builds, and node names between ComfyUI versions). Checked for the
    workflows this ComfyUI can run: the others use node types or inputs it lacks (they are generated with ComfyUI
    make_workflows.GENERATE_WITH, and checked here on a ComfyUI that new)."""
    from PIL import Image

    wf = mw.build(name, server.defs)
    data = without_added_outputs(wf.to_json(), load(name))
    assert (mw.OUT / f"{name}.json").read_text(encoding="utf-8") == mw.json_text(data), (
        "stale workflow: run python tests/make_workflows.py"
    )
    committed = Image.open(mw.OUT / f"{name}.jpg").convert("RGB")
    fresh = Image.open(io.BytesIO(mw.thumbnail_bytes(data, wf.title, server.defs))).convert("RGB")
    assert committed.size == fresh.size == mw.THUMB
    if mw.parse_version(COMFYUI_VERSION) != mw.parse_version(mw.GENERATE_WITH):
        return  # the thumbnail shows node names as the generating ComfyUI words them (0.33 renamed some)
    diff = sum(abs(a - b) for a, b in zip(committed.tobytes(), fresh.tobytes(), strict=True))
    assert diff / len(committed.tobytes()) < 2.0, "stale thumbnail: run python tests/make_workflows.py"


def test_generator_refuses_what_the_node_definitions_do_not_allow(server):
    """The builder takes every widget value by input name, as the node definitions name them, and refuses anything
    else: an unknown node type, a widget the node lacks, a widget left out, a link between types that do not fit,
    a socket linked twice."""
    wf = mw.Workflow("refused", "refused", server.defs)
    sampler_widgets = {
        "seed": 42,
        mw.CONTROL: "fixed",
        "steps": 20,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
    }
    sampler = wf.add("KSampler", (0, 0), **sampler_widgets)
    assert list(sampler.widgets) == [w.name for w in server.defs["KSampler"].widgets]  # the definition's order
    with pytest.raises(mw.WorkflowError, match="NoSuchNode"):
        wf.add("NoSuchNode", (0, 0))
    with pytest.raises(mw.WorkflowError, match="KSampler: no widget \\['stepz'\\]; no value for \\['steps'\\]"):
        wf.add("KSampler", (0, 0), **{k: v for k, v in sampler_widgets.items() if k != "steps"}, stepz=20)
    with pytest.raises(mw.WorkflowError, match="no value for \\['control_after_generate'\\]"):
        wf.add("KSampler", (0, 0), **{k: v for k, v in sampler_widgets.items() if k != mw.CONTROL})
    latent = wf.add("EmptySD3LatentImage", (0, 0), width=64, height=64, batch_size=1)
    with pytest.raises(mw.WorkflowError, match="LATENT.*cannot feed KSampler.model"):
        wf.connect(latent, "LATENT", sampler, "model")
    with pytest.raises(mw.WorkflowError, match="no socket 'modell'"):
        wf.connect(latent, "LATENT", sampler, "modell")
    wf.connect(latent, "LATENT", sampler, "latent_image")
    with pytest.raises(mw.WorkflowError, match="linked twice"):
        wf.connect(latent, "LATENT", sampler, "latent_image")


def test_generator_says_what_it_needs(tmp_path):
    """python tests/make_workflows.py has a --help, and without a ComfyUI, or with one too old for every workflow,
    says what it needs (exit 2) instead of failing somewhere inside."""
    import os
    import subprocess
    import sys

    script = [sys.executable, str(comfyui_env.REPO / "tests" / "make_workflows.py")]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}

    def run(*args, comfyui_path=""):
        done = subprocess.run(
            [*script, *args], env={**env, "COMFYUI_PATH": comfyui_path}, capture_output=True, text=True, timeout=120
        )
        return done.returncode, done.stdout + done.stderr

    code, text = run("--help")
    assert code == 0 and "--check" in text and "--comfyui" in text and "COMFYUI_PATH" in text, text
    code, text = run("--check")
    assert code == 2 and "no ComfyUI checkout found ($COMFYUI_PATH is empty)" in text, text
    assert f"ComfyUI {mw.GENERATE_WITH} or newer" in text and "Traceback" not in text, text
    old = tmp_path / "ComfyUI"
    (old / "comfy").mkdir(parents=True)
    (old / "comfy" / "model_patcher.py").write_text("")
    (old / "main.py").write_text("raise SystemExit('not to be started')\n")
    (old / "comfyui_version.py").write_text('__version__ = "0.3.40"\n')
    code, text = run("--check", comfyui_path=str(old))
    assert code == 2 and "is 0.3.40: it lacks node types or inputs" in text, text


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_ui_format(name):
    """The frame the frontend writes: ids, counters, link table consistent with each node's sockets."""
    wf = load(name)
    assert wf["version"] == 0.4 and isinstance(wf["groups"], list) and wf["config"] == {}
    ids = [n["id"] for n in wf["nodes"]]
    assert len(set(ids)) == len(ids) and wf["last_node_id"] == max(ids)
    assert wf["last_link_id"] == max((link[0] for link in wf["links"]), default=0)
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(ids)))
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, out, dst, inp, _ in wf["links"]:
        assert nodes[dst]["inputs"][inp]["link"] == link_id
        assert link_id in nodes[src]["outputs"][out]["links"]
        assert nodes[src]["order"] < nodes[dst]["order"]
    for node in wf["nodes"]:
        for slot, output in enumerate(node["outputs"]):
            for link_id in output["links"] or []:
                assert wf["links"][link_id - 1][:3] == [link_id, node["id"], slot]
        if node["type"] not in mw.FRONTEND_ONLY:
            assert node["properties"]["Node name for S&R"] == node["type"]
    notes = [n for n in wf["nodes"] if n["type"] in mw.FRONTEND_ONLY]
    assert any("ComfyUI/models/" in n["widgets_values"][0] for n in notes), "no note says where files go"


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_layout_has_no_overlaps(name):
    """Nodes (with their 30 px title bars above pos) do not overlap one another at their saved sizes, and each
    group holds whole nodes only, below its title strip."""
    nodes = load(name)["nodes"]
    boxes = [
        (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n["type"])
        for n in nodes
    ]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a[4]} overlaps {b[4]}"
    for group in load(name)["groups"]:
        gx, gy, gw, gh = group["bounding"]
        for x0, y0, x1, y1, type_ in boxes:
            inside = gx <= x0 and x1 <= gx + gw and gy + group["font_size"] * 1.4 <= y0 and y1 <= gy + gh
            apart = x1 <= gx or gx + gw <= x0 or y1 <= gy or gy + gh <= y0
            assert inside or apart, f"group '{group['title']}' cuts through {type_}"


def node_problems(info: dict, node: dict) -> list[str]:
    """What keeps the frontend of a server with `info` (/object_info) from building `node` as saved: an unknown
    type, other sockets or outputs (a newer ComfyUI may add outputs at the end of a node's, e.g. 0.33's Preview
    Image and Preview Any; its frontend adds them to a node saved without them), another number of widget values
    than the frontend's widgets (its make_workflows.frontend_view), or a widget value that does not fit (type,
    range, choices incl. files). Empty when the node is fine. A problem with a widget value names that widget."""
    if node["type"] not in info:
        return ["unknown node type"]
    info = info[node["type"]]
    problems = []
    widgets, sockets = mw.frontend_view(info)
    if [(i["name"], i["type"], i.get("shape") == 7) for i in node["inputs"]] != sockets:
        problems.append(f"sockets {sockets}")
    outputs = list(zip(info["output_name"], info["output"], strict=True))
    if [(o["name"], o["type"]) for o in node["outputs"]] != outputs[: len(node["outputs"])]:
        problems.append(f"outputs {info['output_name']}")
    values = node["widgets_values"]
    if len(values) != len(widgets):
        return [*problems, f"{len(values)} widget values for the widgets here {[w.name for w in widgets]}"]
    for (wname, kind, opts, choices), value in zip(widgets, values, strict=True):
        at = f"{wname} = {value!r}"
        if kind == "CONTROL":
            ok = value in CONTROL_VALUES
        elif kind == "UPLOAD":
            ok = value == "image"
        elif kind == "COMBO":
            ok, at = value in choices, f"{at} not in {choices}"
        elif kind == "BOOLEAN":
            ok = isinstance(value, bool)
        elif kind == "STRING":
            ok = isinstance(value, str)
        else:
            ok = (
                isinstance(value, int if kind == "INT" else (int, float))
                and not isinstance(value, bool)
                and opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf"))
            )
        if not ok:
            problems.append(at)
    return problems


@pytest.mark.parametrize("name", WORKFLOWS)
def test_nodes_match_object_info(server, name):
    """Every node type is known (notes are frontend-only), its sockets and outputs are the server's, and its
    widget values are as many as the frontend's widgets and fit them (types, ranges, choices incl. files)."""
    for node in load(name)["nodes"]:
        where = f"{name}: node {node['id']} {node['type']}"
        if node["type"] in mw.FRONTEND_ONLY:
            assert len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str), where
            continue
        assert not node_problems(server.info, node), f"{where}: {node_problems(server.info, node)}"


def test_needs_newer_comfyui_is_exact(server):
    """The version filter hides nothing but what it must. Each workflow declares the oldest ComfyUI it needs
    (min_comfyui) and why: node types older ComfyUI lacks (new_node_types) and node types it has in an older form
    (changed_node_types: the widget, or widget=choice, that is newer). On a ComfyUI older than min_comfyui, the
    node types the server lacks are exactly new_node_types, the known types that do not fit are exactly
    changed_node_types (a newer choice: each problem names its widget; a newer widget: this ComfyUI lacks it, and
    the saved node has one value more than its widgets), every other node passes every node check, and the
    generator refuses to build the workflow from this ComfyUI's definitions, naming a declared type or widget. On a
    ComfyUI that runs the workflow, the declared types exist. min_comfyui is the pack's own minimum exactly when
    nothing newer is declared."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "saferope_version_check", comfyui_env.REPO / "saferope_comfy" / "version_check.py"
    )
    version_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(version_check)
    assert mw.parse_version(mw.PACK_MIN_COMFYUI) == version_check.MINIMUM_COMFYUI
    older = []
    for name in ALL_WORKFLOWS:
        needs = load(name)["extra"]["saferope"]
        new_types, changed = set(needs["new_node_types"]), needs["changed_node_types"]
        declared = bool(new_types or changed)
        assert declared == (mw.parse_version(needs["min_comfyui"]) > version_check.MINIMUM_COMFYUI), name
        problems = {}
        for node in load(name)["nodes"]:
            if node["type"] not in mw.FRONTEND_ONLY and node_problems(server.info, node):
                problems.setdefault(node["type"], []).extend(node_problems(server.info, node))
        if name in WORKFLOWS:
            assert not problems, f"{name}: {problems}"
            assert new_types | set(changed) <= set(server.info), name
            continue
        older.append(name)
        missing = {t for t in problems if t not in server.info}
        assert missing == new_types, f"{name}: ComfyUI {COMFYUI_VERSION} lacks {missing}, declared {new_types}"
        assert set(problems) - missing == set(changed), f"{name}: on ComfyUI {COMFYUI_VERSION}: {problems}"
        for type_, widget in changed.items():
            here = server.defs[type_].widget_names
            if "=" in widget:  # a newer choice of a widget this ComfyUI has
                assert all(widget.split("=")[0] in p for p in problems[type_]), f"{name}: {type_}: {problems[type_]}"
            else:  # a newer widget
                assert widget not in here, f"{name}: {type_} has {widget} on ComfyUI {COMFYUI_VERSION}"
                assert all(p.startswith(f"{len(here) + 1} widget values") for p in problems[type_]), (
                    f"{name}: {type_}: {problems[type_]}"
                )
        with pytest.raises(mw.WorkflowError) as refused:
            mw.build(name, server.defs)
        assert any(what.split("=")[0] in str(refused.value) for what in [*new_types, *changed.values()]), (
            f"{name}: {refused.value}"
        )
    assert older == [n for n in ALL_WORKFLOWS if n not in WORKFLOWS]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_links_and_required_inputs(server, name):
    """Each link's type is its source output's type and fits the target input; every required socket is linked."""
    wf = load(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for _, src, out, dst, inp, type_ in wf["links"]:
        source, target = server.info[nodes[src]["type"]], server.info[nodes[dst]["type"]]
        assert type_ == source["output"][out], f"{name}: link type {type_} from {nodes[src]['type']}"
        _, sockets = mw.frontend_view(target)
        assert sockets[inp][1] in (type_, "*"), f"{name}: {type_} into {nodes[dst]['type']}.{sockets[inp][0]}"
    for node in wf["nodes"]:
        if node["type"] in mw.FRONTEND_ONLY:
            continue
        for socket in node["inputs"]:
            if socket.get("shape") != 7:
                assert socket["link"] is not None, f"{name}: {node['type']}.{socket['name']} is not linked"


def notes_text(wf: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in mw.FRONTEND_ONLY)


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_model_files_have_a_source(server, name):
    """Each model file a loader names is in properties.models with its folder and a Hugging Face URL ending in
    the file name (the frontend's missing-models dialog downloads from there), and the notes name it as a link to
    that URL under its folder; each pack and UVR anchors file is named in the notes with its folder."""
    wf = load(name)
    notes = notes_text(wf)
    for node in wf["nodes"]:
        if node["type"] not in FILE_LOADERS:
            continue
        for widget, value in widgets(node, server.defs).items():
            folder = mw.FILE_WIDGETS.get((node["type"], widget))
            if folder in (None, "input"):
                continue
            if folder in mw.MADE_FOLDERS:  # made by build_a_pack, or yours
                assert f"ComfyUI/models/{folder}/{value}" in notes, f"{name}: the notes do not name {value}"
                continue
            models = {m["name"]: m for m in node["properties"].get("models", [])}
            assert value in models, f"{name}: {node['type']}.{widget} {value} has no download source"
            assert models[value]["directory"] == folder
            assert models[value]["url"].startswith("https://huggingface.co/")
            assert models[value]["url"].endswith("/" + value)
            assert f"[{value}]({models[value]['url']})" in notes, f"{name}: the notes do not link {value}"
            listed = notes[: notes.index(f"[{value}]")]
            assert listed.rfind(f"`ComfyUI/models/{folder}/`") > max(
                listed.rfind(f"`ComfyUI/models/{other}/`")
                for other in ("diffusion_models", "text_encoders", "vae")
                if other != folder
            ), f"{name}: the notes list {value} under another folder"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_server_accepts_the_graph(server, name):
    """POST /prompt with the API form of the workflow: ComfyUI validates every input (no 400); running stops at
    the first loader, whose model file here is an empty placeholder, and nowhere else."""
    prompt = mw.to_api(load(name), server.defs)
    entry = server.wait(server.post_prompt(prompt), timeout=60)
    status = entry["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    loaders = {
        "UNETLoader",
        "DualCLIPLoader",
        "CLIPLoader",
        "VAELoader",
        "LoadSafeRoPEPack",
        "LoadSafetyPack",
        "LoadUVRAnchors",
    }
    assert status["status_str"] == "error" and errors, f"{name}: expected a loader to fail on its placeholder"
    assert errors[0]["node_type"] in loaders, f"{name}: {errors[0]['node_type']}: {errors[0]['exception_message']}"


# The model a workflow samples with: the loader, each node that patches the model, the guider (custom sampling),
# the sampler. The FLUX.1 text-to-image and Kontext examples apply the safety pack (every guard, UVR included, which
# on an edit also covers what comes from the reference image); SafeRoPE and UVR are stacked on the FLUX.2 edit; the
# UVR and redirector text-to-image examples show one guard alone, from its own file.
MODEL_PATHS = {
    "flux1_dev_text_to_image_with_pack": ["UNETLoader", "ApplySafetyPack", "KSampler"],
    "flux1_schnell_text_to_image_with_pack": ["UNETLoader", "ApplySafetyPack", "KSampler"],
    "flux1_dev_text_to_image_with_uvr": ["UNETLoader", "RestrictUnsafeFlow", "KSampler"],
    "flux1_dev_text_to_image_with_redirector": ["UNETLoader", "RedirectUnsafePrompts", "KSampler"],
    "flux1_kontext_edit_with_pack": ["UNETLoader", "ApplySafetyPack", "KSampler"],
    "safety_report_batch": ["UNETLoader", "ApplyRiskRotation", "KSampler"],
    "flux2_text_to_image_with_pack": ["UNETLoader", "ApplyRiskRotation", "BasicGuider", "SamplerCustomAdvanced"],
    "flux2_edit_with_pack_and_uvr": [
        "UNETLoader",
        "ApplyRiskRotation",
        "RestrictUnsafeFlow",
        "BasicGuider",
        "SamplerCustomAdvanced",
    ],
    "chroma_text_to_image_with_pack": ["UNETLoader", "ModelSamplingAuraFlow", "ApplyRiskRotation", "KSampler"],
}
SAMPLERS = {"KSampler", "SamplerCustomAdvanced"}
GUIDERS = {"BasicGuider", "CFGGuider"}  # SamplerCustomAdvanced samples the model of its guider
# Each guard: the socket that takes what it applies, and the loader that must feed it
GUARD_INPUTS = {
    "ApplyRiskRotation": ("pack", "LoadSafeRoPEPack"),
    "RestrictUnsafeFlow": ("anchors", "LoadUVRAnchors"),
    "RedirectUnsafePrompts": ("redirector", "LoadPromptRedirector"),
    "ApplySafetyPack": ("safety_pack", "LoadSafetyPack"),
}
GUARDS = set(GUARD_INPUTS)


def upstream(wf: dict, node: dict, socket: str) -> dict | None:
    """The node whose output feeds `socket` of `node`, or None when it is not linked."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    link_id = next((i["link"] for i in node["inputs"] if i["name"] == socket), None)
    return None if link_id is None else nodes[links[link_id][1]]


def model_source(wf: dict, node: dict) -> dict | None:
    """The node a sampler, guider or model patch takes its model from: its `model` input, or for
    SamplerCustomAdvanced the guider on its `guider` input (whose `model` is the one sampled)."""
    return upstream(wf, node, "guider" if node["type"] == "SamplerCustomAdvanced" else "model")


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_model_path_to_the_sampler(name):
    """Following the sampler's model back to the loader (KSampler's `model`; SamplerCustomAdvanced's `guider`,
    then the guider's `model`) gives the expected chain of patches, with a SafeRoPE guard on it (a workflow with a
    sampler or guider must be listed in MODEL_PATHS); the guards' own inputs are linked to their loaders, and a
    guard off the path is not in the graph, nor its loader."""
    wf = load(name)
    samplers = [n for n in wf["nodes"] if n["type"] in SAMPLERS]
    if name not in MODEL_PATHS:
        assert not samplers and all(n["type"] not in GUIDERS for n in wf["nodes"]), (
            f"{name}: samples, but its model path is not in MODEL_PATHS"
        )
        return
    assert len(samplers) == 1, name
    path, node = [], samplers[0]
    while node is not None:
        path.insert(0, node["type"])
        node = model_source(wf, node)
    assert path == MODEL_PATHS[name], f"{name}: the sampler's model comes through {path}"
    assert GUARDS & set(path), f"{name}: samples an unguarded model"
    guiders = [n for n in wf["nodes"] if n["type"] in GUIDERS]
    assert len(guiders) == (samplers[0]["type"] == "SamplerCustomAdvanced"), f"{name}: a guider the sampler skips"
    for node in wf["nodes"]:
        if node["type"] in GUARD_INPUTS:
            socket, loader = GUARD_INPUTS[node["type"]]
            assert upstream(wf, node, socket)["type"] == loader, f"{name}: {node['type']}.{socket}"
    for guard, (_, loader) in GUARD_INPUTS.items():
        if guard not in MODEL_PATHS[name]:
            assert all(n["type"] not in (guard, loader) for n in wf["nodes"]), (
                f"{name}: does not sample through {guard}, but has it or {loader}"
            )


def widgets(node: dict, defs: dict) -> dict:
    """A node's widget values by name, in the order of the server's node definitions (make_workflows.node_defs)."""
    return mw.named_widgets(node, defs)


def loaded_files(wf: dict, defs: dict) -> set[tuple[str, str, str]]:
    """(loader, folder, file) of each pack, safety pack, UVR anchors and redirector file a workflow loads."""
    return {
        (node["type"], folder, value)
        for node in wf["nodes"]
        if node["type"] in FILE_LOADERS
        for widget, value in widgets(node, defs).items()
        if (folder := mw.FILE_WIDGETS.get((node["type"], widget))) in mw.MADE_FOLDERS
    }


def model_family(wf: dict, defs: dict) -> str | None:
    """The model family of the diffusion model a workflow loads (make_workflows.FAMILY), None without one."""
    families = {mw.FAMILY[widgets(n, defs)["unet_name"]] for n in wf["nodes"] if n["type"] == "UNETLoader"}
    assert len(families) <= 1, families
    return next(iter(families), None)


def test_workflows_load_what_build_a_pack_saves(server):
    """Every pack, safety pack, UVR anchors and redirector file an example loads is one build_a_pack saves (with
    the saver of the loader's kind, to the folder the loader lists), or, for another model family, one whose note
    says how build_a_pack makes it: with that family's diffusion model and text encoder loaded, saved under the
    file's name. A file is only ever used with one model family (packs and anchors do not transfer between
    families); everything build_a_pack saves is loaded by an example; build_a_pack collects the Q/K statistics and
    the UVR anchors and trains the redirector from the same Prompt Set, and its safety pack holds the very pack,
    anchors and redirector it saves separately, with that Prompt Set."""
    build, defs = load("build_a_pack"), server.defs
    savers = (
        ("SaveSafeRoPEPack", "LoadSafeRoPEPack", "pack_name"),
        ("SaveSafetyPack", "LoadSafetyPack", "name"),
        ("SaveUVRAnchors", "LoadUVRAnchors", "name"),
        ("SavePromptRedirector", "LoadPromptRedirector", "name"),
    )
    saved = {
        (loader, mw.FILE_WIDGETS[(loader, widget)], widgets(n, defs)["name"] + ".safetensors")
        for n in build["nodes"]
        for saver, loader, widget in savers
        if n["type"] == saver
    }
    assert {loader for loader, _, _ in saved} == {loader for _, loader, _ in savers}, saved
    assert {folder for _, folder, _ in saved} == set(mw.MADE_FOLDERS), saved
    families = {file[1:]: {model_family(build, defs)} for file in saved}
    loaded = set()
    for name in ALL_WORKFLOWS:
        wf = load(name)
        notes = notes_text(wf)
        for loader, folder, value in loaded_files(wf, defs):
            loaded.add((loader, folder, value))
            families.setdefault((folder, value), set()).add(model_family(wf, defs))
            if (loader, folder, value) in saved:
                continue
            unet = next(widgets(n, defs) for n in wf["nodes"] if n["type"] == "UNETLoader")["unet_name"]
            clip = next(widgets(n, defs) for n in wf["nodes"] if n["type"] in ("CLIPLoader", "DualCLIPLoader"))
            stem = value.removesuffix(".safetensors")
            assert "**build_a_pack**" in notes and f"`{stem}`" in notes, (
                f"{name}: loads {value}; no note says how build_a_pack makes it (saved as `{stem}`)"
            )
            for file in (unet, *(v for k, v in clip.items() if k.startswith("clip_name"))):
                assert f"`{file}`" in notes, f"{name}: the note on {value} does not say to load {file} in build_a_pack"
    for file, used_with in families.items():
        assert len(used_with) == 1, f"{file[1]} is used with model families {used_with}"
    made = {
        ("LoadSafeRoPEPack", mw.PACK_FOLDER, mw.PACK_FILE),
        ("LoadSafetyPack", mw.PACK_FOLDER, mw.SAFETY_PACK_FILE),
        ("LoadUVRAnchors", mw.ANCHORS_FOLDER, mw.ANCHORS_FILE),
        ("LoadPromptRedirector", mw.REDIRECTOR_FOLDER, mw.REDIRECTOR_FILE),
    }
    assert made == saved, saved
    assert made <= loaded, made - loaded
    users = ("CollectQK", "CollectUVRAnchors", "TrainRiskRotations", "TrainPromptRedirector", "SaveSafetyPack")
    sources = {upstream(build, n, "prompts")["id"] for n in build["nodes"] if n["type"] in users}
    assert len(sources) == 1, f"{', '.join(users)} use different prompts"
    parts = {"pack": "SaveSafeRoPEPack", "anchors": "SaveUVRAnchors", "redirector": "SavePromptRedirector"}
    (safety,) = (n for n in build["nodes"] if n["type"] == "SaveSafetyPack")
    for socket, saver in parts.items():
        (separate,) = (n for n in build["nodes"] if n["type"] == saver)
        assert upstream(build, safety, socket)["id"] == upstream(build, separate, socket)["id"], (
            f"Save Safety Pack's {socket} is not what {saver} saves"
        )


def test_safety_pack_is_applied_as_built(server):
    """Apply Safety Pack runs at its defaults (strength 1, every guard on, the guards the pack's check chose), the
    values the notes describe, on the safety pack build_a_pack writes."""
    inputs = server.info["ApplySafetyPack"]["input"]
    specs = {**inputs["required"], **inputs.get("optional", {})}
    defaults = {k: spec[1]["default"] for k, spec in specs.items() if k not in ("model", "safety_pack")}
    assert defaults == {"strength": 1.0, "redirect": True, "rotate": True, "restrict": True, "guards": "as checked"}
    applied = []
    for name in ALL_WORKFLOWS:
        wf = load(name)
        for node in wf["nodes"]:
            if node["type"] == "ApplySafetyPack":
                assert widgets(node, server.defs) == defaults, name
                loader = upstream(wf, node, "safety_pack")
                assert widgets(loader, server.defs) == {"name": mw.SAFETY_PACK_FILE}, name
                applied.append(name)
    assert sorted(applied) == sorted(n for n, path in MODEL_PATHS.items() if "ApplySafetyPack" in path)


def test_uvr_settings_are_the_papers(server):
    """UVR as in the paper: anchors collected at single block 10 (of FLUX's 38) in the start-up steps, restriction
    from sigma 0.85 at the anchors' block with their calibrated threshold, full strength; every value is within
    the live node's range (checked above) and Restrict's are the node's defaults."""
    restrict_inputs = server.info["RestrictUnsafeFlow"]["input"]["required"]
    seen = set()
    for name in ALL_WORKFLOWS:
        for node in load(name)["nodes"]:
            if node["type"] == "CollectUVRAnchors":
                values = widgets(node, server.defs)
                assert values["detection_block"] == 10 < 38, name
                sigmas = [float(s) for s in values["sigmas"].split(",")]
                assert sigmas == sorted(sigmas, reverse=True) and min(sigmas) >= 0.85, name
                seen.add(node["type"])
            if node["type"] == "RestrictUnsafeFlow":
                values = widgets(node, server.defs)
                assert values == {"strength": 1.0, "threshold": -1.0, "sigma_start": 0.85, "detection_block": -1}, name
                assert values == {k: restrict_inputs[k][1]["default"] for k in values}, name
                seen.add(node["type"])
    assert seen == {"CollectUVRAnchors", "RestrictUnsafeFlow"}


def test_templates_are_listed_and_served(server):
    """GET /workflow_templates names every workflow under the pack's folder name; each JSON and its .jpg
    thumbnail (the URL the frontend's template browser builds) is served as committed."""
    from PIL import Image

    listing = json.loads(get(server, "/workflow_templates")[0])
    assert sorted(listing.get(MODULE, [])) == ALL_WORKFLOWS
    for name in ALL_WORKFLOWS:
        body, _ = get(server, f"/api/workflow_templates/{MODULE}/{name}.json")
        assert json.loads(body) == load(name)
        body, content_type = get(server, f"/api/workflow_templates/{MODULE}/{name}.jpg")
        assert content_type == "image/jpeg" and body == (mw.OUT / f"{name}.jpg").read_bytes()
        assert Image.open(io.BytesIO(body)).size == mw.THUMB
