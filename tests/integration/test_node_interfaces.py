"""Every node's interface as a live ComfyUI server reports it (/object_info): ids, display names, categories, input
names, sections, types, defaults, ranges and choices, outputs. Saved workflows and API-format graphs depend on
them, so they may only change on purpose: `tests/data/node_interfaces.json` is the committed list (regenerate it
with `python tests/integration/test_node_interfaces.py` against a checkout, and review the diff)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository holds bench.comfyui_env, tests/ comfy_server
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from bench import comfyui_env  # noqa: E402

COMMITTED = comfyui_env.REPO / "tests" / "data" / "node_interfaces.json"
MODULE = "ComfyUI-SafeRoPE"
FILE_LISTS = {
    ("LoadSafeRoPEPack", "pack_name"),
    ("LoadStatistics", "name"),
    ("LoadUVRAnchors", "name"),
    ("LoadSafetyPack", "name"),
}
KEPT_OPTIONS = ("default", "min", "max", "step")


def normalise(info: dict) -> dict:
    """The parts of /object_info a workflow depends on, the same for V1 and V3 nodes."""
    nodes = {}
    for node_id, node in sorted(info.items()):
        inputs = []
        for section in ("required", "optional"):  # hidden inputs are the server's business, not a workflow's
            for name in node.get("input_order", {}).get(section, node["input"].get(section, {})):
                spec = node["input"][section][name]
                kind, options = (spec[0], spec[1] if len(spec) > 1 else {}) if isinstance(spec, list) else (spec, {})
                entry = {"name": name, "section": section}
                if isinstance(kind, list) or kind == "COMBO":
                    choices = kind if isinstance(kind, list) else options.get("options", [])
                    entry["type"] = "COMBO"
                    if (node_id, name) not in FILE_LISTS:  # file lists depend on the models folder
                        entry["choices"] = list(choices)
                else:
                    entry["type"] = kind
                entry.update({k: options[k] for k in KEPT_OPTIONS if k in options})
                if options.get("multiline"):  # V3 also says multiline false
                    entry["multiline"] = True
                inputs.append(entry)
        outputs = [
            {"name": n, "type": t, "list": bool(is_list)}
            for n, t, is_list in zip(node["output_name"], node["output"], node["output_is_list"], strict=True)
        ]
        nodes[node_id] = {
            "display_name": node["display_name"],
            "category": node["category"],
            "output_node": bool(node["output_node"]),
            "inputs": inputs,
            "outputs": outputs,
        }
    return nodes


def served_interfaces() -> dict:
    from comfy_server import ComfyServer

    with ComfyServer({MODULE: comfyui_env.REPO}) as server:
        info = server.object_info()
    return normalise({k: v for k, v in info.items() if v.get("python_module", "").endswith(MODULE)})


def test_object_info_matches_the_committed_interfaces(comfy):
    committed = json.loads(COMMITTED.read_text())
    served = served_interfaces()
    assert sorted(served) == sorted(committed)
    for node_id in committed:
        assert served[node_id] == committed[node_id], node_id


if __name__ == "__main__":
    comfyui_env.import_comfyui()
    COMMITTED.write_text(json.dumps(served_interfaces(), indent=1) + "\n")
    print(f"wrote {COMMITTED}", file=sys.stderr)
