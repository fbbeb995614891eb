"""README.md's `## Node reference` against the nodes' own V3 schemas: every node of the pack is documented once, with
its display name, node id and category, exactly its inputs (in schema order, optional ones marked) and exactly its
outputs (in order, by the name the frontend shows: the display name, or the type when there is none).

The section's format, one entry per node:

    ### <display name>

    `<node id>` in *<category>*. <what it does>

    - Inputs:
      - `<input>`: <a few words>
      - `<input>` (optional): <a few words>
    - Outputs:
      - `<output>`: <a few words>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from bench import comfyui_env

README = comfyui_env.REPO / "README.md"
SECTION, NEXT_SECTION = "## Node reference", "## Layout"  # the section, and the one right after it
HEAD = re.compile(r"`(?P<id>[^`]+)` in \*(?P<category>[^*]+)\*\.")
ITEM = re.compile(r"  - `(?P<name>[^`]+)`(?P<optional> \(optional\))?: \S")


@dataclass
class Entry:
    display_name: str
    node_id: str
    category: str
    inputs: list[tuple[str, bool]]  # (name, optional)
    outputs: list[str]


def section_text(readme: str) -> str:
    """The body of the Node reference section; it must be followed directly by the Layout section."""
    headings = re.findall(r"^## .*$", readme, flags=re.M)
    assert headings.count(SECTION) == 1, f"README.md needs one '{SECTION}' section"
    after = headings[headings.index(SECTION) + 1] if headings[-1] != SECTION else None
    assert after == NEXT_SECTION, f"'{SECTION}' must come right before '{NEXT_SECTION}', not before {after!r}"
    start = readme.index(f"\n{SECTION}\n") + len(SECTION) + 2
    return readme[start : readme.index(f"\n{NEXT_SECTION}\n", start)]


def parse(section: str) -> list[Entry]:
    """The entries of the section, in order. Raises AssertionError (naming the node and line) on any line the
    format does not allow inside an entry."""
    entries = []
    blocks = re.split(r"^### ", section, flags=re.M)[1:]
    assert blocks, "no '### <node>' entries"
    for block in blocks:
        title, *lines = block.rstrip("\n").split("\n")
        body = [line for line in lines if line.strip()]
        head = HEAD.match(body[0]) if body else None
        assert head, f"{title}: the entry must start with '`NodeId` in *category*.', not {body[:1]}"
        entry = Entry(title.strip(), head["id"], head["category"], [], [])
        target = None
        for line in body[1:]:
            if line in ("- Inputs:", "- Outputs:"):
                assert target is None or (target is entry.inputs and line == "- Outputs:"), (
                    f"{title}: '- Inputs:' then '- Outputs:', each once ({line!r})"
                )
                target = entry.inputs if line == "- Inputs:" else entry.outputs
            elif target is not None and (item := ITEM.match(line)):
                if target is entry.inputs:
                    target.append((item["name"], bool(item["optional"])))
                else:
                    assert not item["optional"], f"{title}: an output is never optional ({line!r})"
                    target.append(item["name"])
            elif target is not None and line.startswith("    ") and not line.strip().startswith("-"):
                continue  # the item's text, wrapped
            elif target is None and not line.startswith("-"):
                continue  # the description, before the lists
            else:
                raise AssertionError(f"{title}: unexpected line {line!r}")
        assert target is entry.outputs, f"{title}: needs '- Inputs:' and '- Outputs:' lists"
        entries.append(entry)
    return entries


def schema_entry(schema) -> Entry:
    """What the README must say of a node, from its V3 schema (output names as ComfyUI's /object_info gives them)."""
    return Entry(
        schema.display_name,
        schema.node_id,
        schema.category,
        [(i.id, bool(i.optional)) for i in schema.inputs],
        [o.display_name or o.io_type for o in schema.outputs],
    )


def differences(documented: list[Entry], schemas: dict) -> list[str]:
    """Every way the documented entries differ from the schemas (empty when they agree)."""
    problems = []
    ids = [e.node_id for e in documented]
    problems += [f"{i}: documented {ids.count(i)} times" for i in sorted(set(ids)) if ids.count(i) > 1]
    problems += [f"{i}: not documented" for i in schemas if i not in ids]
    problems += [f"{i}: documented, but the pack has no such node" for i in ids if i not in schemas]
    for entry in documented:
        if entry.node_id not in schemas:
            continue
        want = schema_entry(schemas[entry.node_id])
        for what in ("display_name", "category", "inputs", "outputs"):
            if getattr(entry, what) != getattr(want, what):
                problems.append(f"{entry.node_id} {what}: README {getattr(entry, what)}, node {getattr(want, what)}")
    return problems


@pytest.fixture(scope="module")
def schemas(pack, tmp_path_factory):
    """Every node's V3 schema by node id, in the pack's order (file lists read from empty temp model folders)."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    names = pack.saferope_comfy.model_files.FOLDERS
    for name in names:
        folder_paths.filename_list_cache.pop(name, None)
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            (root / name).mkdir()
            mp.setitem(folder_paths.folder_names_and_paths, name, ([str(root / name)], {".safetensors"}))
        found = {s.node_id: s for s in (cls.define_schema() for cls in pack.nodes.NODES)}
    for name in names:
        folder_paths.filename_list_cache.pop(name, None)
    assert len(found) == len(pack.nodes.NODES), "two nodes share a node id"
    return found


@pytest.fixture(scope="module")
def documented() -> list[Entry]:
    return parse(section_text(README.read_text(encoding="utf-8")))


def test_every_node_is_documented_once(documented, schemas):
    ids = [e.node_id for e in documented]
    assert sorted(ids) == sorted(schemas), differences(documented, schemas)
    assert len(ids) == len(set(ids)), differences(documented, schemas)


def test_entries_match_the_schemas(documented, schemas):
    """Display name, category, inputs (names, order, optional) and outputs (names, order) of every entry."""
    problems = differences(documented, schemas)
    assert not problems, "README.md's Node reference is out of date:\n" + "\n".join(problems)


def test_the_check_catches_a_stale_readme(schemas):
    """The checks above can fail: the README's own text with one thing changed at a time is caught, and the
    format's rules are enforced."""
    readme = README.read_text(encoding="utf-8")
    section = section_text(readme)
    assert not differences(parse(section), schemas)
    node = schema_entry(next(iter(schemas.values())))  # the first node, and its first and last input
    first, last = node.inputs[0][0], node.inputs[-1][0]
    first_line = next(line for line in section.split("\n") if line.startswith(f"  - `{first}`"))
    cut = section.index(f"### {node.display_name}\n")
    entry_end = section.find("\n### ", cut + 1)
    entry_end = len(section) if entry_end < 0 else entry_end
    entry = section[cut:entry_end]
    broken = {
        "an input left out": entry.replace(first_line + "\n", "", 1),
        "inputs out of order": entry.replace(first_line + "\n", "", 1).replace(
            "- Outputs:", first_line + "\n- Outputs:", 1
        ),
        "an input renamed": entry.replace(f"`{last}`", f"`{last}_renamed`", 1),
        "optional marked wrongly": entry.replace(f"`{first}`:", f"`{first}` (optional):", 1),
        "an output left out": entry.rstrip("\n").rsplit("\n", 1)[0] + "\n",
        "another display name": entry.replace(f"### {node.display_name}", f"### {node.display_name} (old)", 1),
        "another category": entry.replace(f"*{node.category}*", "*Elsewhere*", 1),
        "the entry gone": "",
    }
    for what, text in broken.items():
        assert text != entry, what
        assert differences(parse(section[:cut] + text + section[entry_end:]), schemas), f"not caught: {what}"
    with pytest.raises(AssertionError, match="right before"):
        section_text(readme.replace(f"\n{NEXT_SECTION}\n", "\n## Another section\n\n## Layout\n", 1))
    with pytest.raises(AssertionError, match="unexpected line"):
        parse(section.replace("- Outputs:", "- Outputs:\n- `stray`: a top-level item", 1))
