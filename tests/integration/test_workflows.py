"""The example workflows in workflows/ against a live ComfyUI with this pack: every node type exists, widget values
fit the node's inputs in the frontend's order, links join matching types, required inputs are linked, model files
come with a download source, the server accepts each graph as a prompt, and ComfyUI serves them as templates with
their thumbnails. Also: the committed files are what tests/make_workflows.py generates.

Each workflow records the oldest ComfyUI it needs (extra.saferope.min_comfyui). The checks against the server run on
the workflows the ComfyUI under test can run (decided at collection time from its comfyui_version.py); the checks
of the files alone run on all of them; test_needs_newer_comfyui_is_exact checks, on a ComfyUI older than a
workflow needs, that what that ComfyUI lacks is exactly what the workflow declares.
"""

from __future__ import annotations

import io
import json
import urllib.request

import make_workflows as mw
import pytest

import comfyui_env

MODULE = "ComfyUI-SafeRoPE"  # the pack's folder name in custom_nodes, as a user clones it
ALL_WORKFLOWS = sorted(p.stem for p in mw.OUT.glob("*.json"))
COMFYUI_VERSION = mw.comfyui_version(comfyui_env.find_comfyui())  # the ComfyUI under test (None: the tier is skipped)
WORKFLOWS = mw.workflows_for(COMFYUI_VERSION)  # those it can run: min_comfyui <= its version
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def load(name: str) -> dict:
    return json.loads((mw.OUT / f"{name}.json").read_text(encoding="utf-8"))


def get(server, path: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")


def frontend_view(info: dict) -> tuple[list[tuple], list[tuple]]:
    """What the frontend builds from one /object_info entry: widgets [(name, kind, spec options, values)] and
    sockets [(name, type, optional)], both in input order (required, then optional)."""
    widgets, sockets = [], []
    order = info["input_order"]
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = info["input"][group][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            values = kind if isinstance(kind, list) else opts.get("options")
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                widgets.append((name, kind, opts, values))
                if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                    widgets.append((mw.CONTROL, "CONTROL", {}, None))
                if kind == "COMBO" and opts.get("image_upload"):
                    widgets.append((mw.UPLOAD, "UPLOAD", {}, None))
            else:
                sockets.append((name, kind, group == "optional"))
    return widgets, sockets


@pytest.fixture(scope="module")
def server(pack):
    """One ComfyUI with the pack (as custom_nodes/ComfyUI-SafeRoPE); the files the workflows name are put where
    the loaders look, so file combos are checked too: empty model files, packs and UVR anchors files that say
    their kind in the pack's metadata but hold no tensors (loaders may list only files of their kind), a real
    small input image."""
    from PIL import Image
    from safetensors.torch import save_file

    from comfy_server import ComfyServer

    kinds = {mw.PACK_FOLDER: pack.saferope_core.pack.PACK_KIND, mw.ANCHORS_FOLDER: pack.saferope_core.uvr.ANCHORS_KIND}

    with ComfyServer({MODULE: comfyui_env.REPO}) as srv:
        for name in ALL_WORKFLOWS:
            for node in load(name)["nodes"]:
                spec = mw.SPECS.get(node["type"])
                for widget, value in zip(spec.widgets if spec else (), node["widgets_values"], strict=False):
                    folder = mw.FILE_WIDGETS.get((node["type"], widget))
                    if folder is None:
                        continue
                    path = srv.base / ("input" if folder == "input" else f"models/{folder}") / value
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if folder == "input":
                        Image.new("RGB", (64, 48), (90, 140, 200)).save(path)
                    elif folder in kinds:
                        metadata = {pack.saferope_core.files.METADATA_KEY: json.dumps({"kind": kinds[folder]})}
                        save_file({}, str(path), metadata=metadata)
                    else:
                        path.write_bytes(b"")
        srv.info = srv.object_info()
        yield srv


def test_every_workflow_is_generated():
    assert ALL_WORKFLOWS == sorted(mw.build_all()), "workflows/ and tests/make_workflows.py disagree on the set"
    assert set(ALL_WORKFLOWS) >= {"flux1_dev_text_to_image_with_pack", "flux1_schnell_text_to_image_with_pack",
                                  "flux1_dev_text_to_image_with_uvr", "flux1_kontext_edit_with_pack", "build_a_pack",
                                  "lrs_visualize", "safety_report_batch", "flux2_text_to_image_with_pack",
                                  "flux2_edit_with_pack_and_uvr", "chroma_text_to_image_with_pack"}
    assert COMFYUI_VERSION is not None, "the ComfyUI under test has no comfyui_version.py"
    assert set(WORKFLOWS) >= {n for n in ALL_WORKFLOWS if mw.min_comfyui(n) == mw.PACK_MIN_COMFYUI}


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_committed_files_are_generated(name):
    """workflows/<name>.json is byte-identical to the generator's output; the thumbnail is the same picture
    (compared by pixels: JPEG bytes may differ between Pillow builds)."""
    from PIL import Image

    wf = mw.build_all()[name]
    data = wf.to_json()
    assert (mw.OUT / f"{name}.json").read_text(encoding="utf-8") == mw.json_text(data), \
        "stale workflow: run python tests/make_workflows.py"
    committed = Image.open(mw.OUT / f"{name}.jpg").convert("RGB")
    fresh = Image.open(io.BytesIO(mw.thumbnail_bytes(data, wf.title))).convert("RGB")
    assert committed.size == fresh.size == mw.THUMB
    diff = sum(abs(a - b) for a, b in zip(committed.tobytes(), fresh.tobytes(), strict=True))
    assert diff / len(committed.tobytes()) < 2.0, "stale thumbnail: run python tests/make_workflows.py"


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
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n["type"])
             for n in nodes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a[4]} overlaps {b[4]}"
    for group in load(name)["groups"]:
        gx, gy, gw, gh = group["bounding"]
        for x0, y0, x1, y1, type_ in boxes:
            inside = gx <= x0 and x1 <= gx + gw and gy + group["font_size"] * 1.4 <= y0 and y1 <= gy + gh
            apart = x1 <= gx or gx + gw <= x0 or y1 <= gy or gy + gh <= y0
            assert inside or apart, f"group '{group['title']}' cuts through {type_}"


def node_problems(info: dict, node: dict) -> list[str]:
    """What keeps the frontend of a server with `info` (/object_info) from building `node` as saved: an unknown
    type, other sockets, outputs or widgets, or a widget value that does not fit (type, range, choices incl. files).
    Empty when the node is fine. A problem with a widget names that widget."""
    if node["type"] not in info:
        return ["unknown node type"]
    info = info[node["type"]]
    problems = []
    if (info["display_name"] or node["type"]) not in mw.SPECS[node["type"]].titles:
        problems.append(f"title {info['display_name']!r}")
    widgets, sockets = frontend_view(info)
    if [(i["name"], i["type"], i.get("shape") == 7) for i in node["inputs"]] != sockets:
        problems.append(f"sockets {sockets}")
    if [(o["name"], o["type"]) for o in node["outputs"]] != list(zip(info["output_name"], info["output"],
                                                                       strict=True)):
        problems.append(f"outputs {info['output_name']}")
    names, saved = [w[0] for w in widgets], list(mw.SPECS[node["type"]].widgets)
    values = node["widgets_values"]
    if names != saved or len(values) != len(widgets):
        differ = [w for w in saved if w not in names] + [w for w in names if w not in saved]
        return [*problems, f"widgets {names} here, {len(values)} values for {saved} (differ: {differ})"]
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
            ok = (isinstance(value, int if kind == "INT" else (int, float)) and not isinstance(value, bool)
                  and opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")))
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
    changed_node_types (each problem naming the declared widget), and every other node passes every node check.
    On a ComfyUI that runs the workflow, the declared types exist. min_comfyui is the pack's own minimum exactly
    when nothing newer is declared."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("saferope_version_check",
                                                  comfyui_env.REPO / "nodes" / "version_check.py")
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
            assert all(widget.split("=")[0] in p for p in problems[type_]), f"{name}: {type_}: {problems[type_]}"
    assert older == [n for n in ALL_WORKFLOWS if n not in WORKFLOWS]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_links_and_required_inputs(server, name):
    """Each link's type is its source output's type and fits the target input; every required socket is linked."""
    wf = load(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for _, src, out, dst, inp, type_ in wf["links"]:
        source, target = server.info[nodes[src]["type"]], server.info[nodes[dst]["type"]]
        assert type_ == source["output"][out], f"{name}: link type {type_} from {nodes[src]['type']}"
        _, sockets = frontend_view(target)
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
def test_model_files_have_a_source(name):
    """Each model file a loader names is in properties.models with its folder and a Hugging Face URL ending in
    the file name (the frontend's missing-models dialog downloads from there), and the notes name it as a link to
    that URL under its folder; each pack and UVR anchors file is named in the notes with its folder."""
    wf = load(name)
    notes = notes_text(wf)
    for node in wf["nodes"]:
        spec = mw.SPECS.get(node["type"])
        for widget, value in zip(spec.widgets if spec else (), node["widgets_values"], strict=False):
            folder = mw.FILE_WIDGETS.get((node["type"], widget))
            if folder in (None, "input"):
                continue
            if folder in (mw.PACK_FOLDER, mw.ANCHORS_FOLDER):  # made by build_a_pack, or yours
                assert f"ComfyUI/models/{folder}/{value}" in notes, f"{name}: the notes do not name {value}"
                continue
            models = {m["name"]: m for m in node["properties"].get("models", [])}
            assert value in models, f"{name}: {node['type']}.{widget} {value} has no download source"
            assert models[value]["directory"] == folder
            assert models[value]["url"].startswith("https://huggingface.co/")
            assert models[value]["url"].endswith("/" + value)
            assert f"[{value}]({models[value]['url']})" in notes, f"{name}: the notes do not link {value}"
            listed = notes[:notes.index(f"[{value}]")]
            assert listed.rfind(f"`ComfyUI/models/{folder}/`") > max(
                listed.rfind(f"`ComfyUI/models/{other}/`") for other in ("diffusion_models", "text_encoders", "vae")
                if other != folder), f"{name}: the notes list {value} under another folder"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_server_accepts_the_graph(server, name):
    """POST /prompt with the API form of the workflow: ComfyUI validates every input (no 400); running stops at
    the first loader, whose model file here is an empty placeholder, and nowhere else."""
    prompt = mw.to_api(load(name))
    entry = server.wait(server.post_prompt(prompt), timeout=60)
    status = entry["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    loaders = {"UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader", "LoadSafeRoPEPack", "LoadUVRAnchors"}
    assert status["status_str"] == "error" and errors, f"{name}: expected a loader to fail on its placeholder"
    assert errors[0]["node_type"] in loaders, f"{name}: {errors[0]['node_type']}: {errors[0]['exception_message']}"


# The model a workflow samples with: the loader, each node that patches the model, the guider (custom sampling),
# the sampler. SafeRoPE and UVR are stacked on the edits (UVR also covers what comes from the reference image); the
# UVR text-to-image example needs no trained pack.
MODEL_PATHS = {
    "flux1_dev_text_to_image_with_pack": ["UNETLoader", "ApplyRiskRotation", "KSampler"],
    "flux1_schnell_text_to_image_with_pack": ["UNETLoader", "ApplyRiskRotation", "KSampler"],
    "flux1_dev_text_to_image_with_uvr": ["UNETLoader", "RestrictUnsafeFlow", "KSampler"],
    "flux1_kontext_edit_with_pack": ["UNETLoader", "ApplyRiskRotation", "RestrictUnsafeFlow", "KSampler"],
    "safety_report_batch": ["UNETLoader", "ApplyRiskRotation", "KSampler"],
    "flux2_text_to_image_with_pack": ["UNETLoader", "ApplyRiskRotation", "BasicGuider", "SamplerCustomAdvanced"],
    "flux2_edit_with_pack_and_uvr": ["UNETLoader", "ApplyRiskRotation", "RestrictUnsafeFlow", "BasicGuider",
                                     "SamplerCustomAdvanced"],
    "chroma_text_to_image_with_pack": ["UNETLoader", "ModelSamplingAuraFlow", "ApplyRiskRotation", "KSampler"],
}
SAMPLERS = {"KSampler", "SamplerCustomAdvanced"}
GUIDERS = {"BasicGuider", "CFGGuider"}  # SamplerCustomAdvanced samples the model of its guider
GUARDS = {"ApplyRiskRotation", "RestrictUnsafeFlow"}


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
    sampler or guider must be listed in MODEL_PATHS); the guards' own inputs are linked to their loaders."""
    wf = load(name)
    samplers = [n for n in wf["nodes"] if n["type"] in SAMPLERS]
    if name not in MODEL_PATHS:
        assert not samplers and all(n["type"] not in GUIDERS for n in wf["nodes"]), \
            f"{name}: samples, but its model path is not in MODEL_PATHS"
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
        if node["type"] == "ApplyRiskRotation":
            assert upstream(wf, node, "pack")["type"] == "LoadSafeRoPEPack", name
        if node["type"] == "RestrictUnsafeFlow":
            assert upstream(wf, node, "anchors")["type"] == "LoadUVRAnchors", name
    if "ApplyRiskRotation" not in MODEL_PATHS[name]:
        assert all(n["type"] not in ("LoadSafeRoPEPack", "ApplyRiskRotation") for n in wf["nodes"]), \
            f"{name}: needs no trained pack, but loads one"


def widgets(node: dict) -> dict:
    """A node's widget values by name (make_workflows' widget order, checked against /object_info above)."""
    return dict(zip(mw.SPECS[node["type"]].widgets, node["widgets_values"], strict=True))


def loaded_files(wf: dict) -> set[tuple[str, str]]:
    """(folder, file) of each pack and UVR anchors file a workflow loads."""
    return {(folder, value) for node in wf["nodes"] for widget, value in widgets(node).items()
            if (folder := mw.FILE_WIDGETS.get((node["type"], widget))) in (mw.PACK_FOLDER, mw.ANCHORS_FOLDER)}


def model_family(wf: dict) -> str | None:
    """The model family of the diffusion model a workflow loads (make_workflows.FAMILY), None without one."""
    families = {mw.FAMILY[widgets(n)["unet_name"]] for n in wf["nodes"] if n["type"] == "UNETLoader"}
    assert len(families) <= 1, families
    return next(iter(families), None)


def test_workflows_load_what_build_a_pack_saves():
    """Every pack and UVR anchors file an example loads is one build_a_pack saves (to the folder the loader
    lists), or, for another model family, one whose note says how build_a_pack makes it: with that family's
    diffusion model and text encoder loaded, saved under the file's name. A file is only ever used with one model
    family (packs and anchors do not transfer between families), and build_a_pack collects the Q/K statistics and
    the UVR anchors from the same Prompt Set."""
    build = load("build_a_pack")
    saved = {(mw.FILE_WIDGETS[(loader, widget)], widgets(n)["name"] + ".safetensors")
             for n in build["nodes"]
             for saver, loader, widget in (("SaveSafeRoPEPack", "LoadSafeRoPEPack", "pack_name"),
                                           ("SaveUVRAnchors", "LoadUVRAnchors", "name"))
             if n["type"] == saver}
    assert {folder for folder, _ in saved} == {mw.PACK_FOLDER, mw.ANCHORS_FOLDER}, saved
    families = {file: {model_family(build)} for file in saved}
    loaded = set()
    for name in ALL_WORKFLOWS:
        wf = load(name)
        notes = notes_text(wf)
        for folder, value in loaded_files(wf):
            loaded.add((folder, value))
            families.setdefault((folder, value), set()).add(model_family(wf))
            if (folder, value) in saved:
                continue
            unet = next(widgets(n) for n in wf["nodes"] if n["type"] == "UNETLoader")["unet_name"]
            clip = next(widgets(n) for n in wf["nodes"] if n["type"] in ("CLIPLoader", "DualCLIPLoader"))
            stem = value.removesuffix(".safetensors")
            assert "**build_a_pack**" in notes and f"`{stem}`" in notes, \
                f"{name}: loads {value}; no note says how build_a_pack makes it (saved as `{stem}`)"
            for file in (unet, *(v for k, v in clip.items() if k.startswith("clip_name"))):
                assert f"`{file}`" in notes, f"{name}: the note on {value} does not say to load {file} in build_a_pack"
    for file, used_with in families.items():
        assert len(used_with) == 1, f"{file[1]} is used with model families {used_with}"
    assert (mw.ANCHORS_FOLDER, mw.ANCHORS_FILE) in loaded and (mw.PACK_FOLDER, mw.PACK_FILE) in loaded
    sources = {upstream(build, n, "prompts")["id"] for n in build["nodes"]
               if n["type"] in ("CollectQK", "CollectUVRAnchors", "TrainRiskRotations")}
    assert len(sources) == 1, "Collect Q/K, Train and Collect UVR Anchors use different prompt sets"


def test_uvr_settings_are_the_papers(server):
    """UVR as in the paper: anchors collected at single block 10 (of FLUX's 38) in the start-up steps, restriction
    from sigma 0.85 at the anchors' block with their calibrated threshold, full strength; every value is within
    the live node's range (checked above) and Restrict's are the node's defaults."""
    restrict_inputs = server.info["RestrictUnsafeFlow"]["input"]["required"]
    seen = set()
    for name in ALL_WORKFLOWS:
        for node in load(name)["nodes"]:
            if node["type"] == "CollectUVRAnchors":
                values = widgets(node)
                assert values["detection_block"] == 10 < 38, name
                sigmas = [float(s) for s in values["sigmas"].split(",")]
                assert sigmas == sorted(sigmas, reverse=True) and min(sigmas) >= 0.85, name
                seen.add(node["type"])
            if node["type"] == "RestrictUnsafeFlow":
                values = widgets(node)
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
