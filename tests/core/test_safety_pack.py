"""The safety pack file: every guard of a concept in one file, one hash, one model check, each guard validated."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saferope_core.files import METADATA_KEY, content_hash
from saferope_core.redirector import PromptRedirector, RedirectorConfig
from saferope_core.safety_pack import SafetyPack, SafetyPackError, load_safety_pack
from saferope_core.uvr import UVRAnchors


@pytest.fixture
def guards(shape, make_pack):
    g = torch.Generator().manual_seed(3)
    anchors = UVRAnchors(
        shape,
        "single.0",
        torch.nn.functional.normalize(torch.randn(shape.heads, 2, shape.head_dim, generator=g), dim=-1),
        torch.randn(shape.heads, shape.head_dim, generator=g),
        0.4,
        0.85,
        ["c"],
    )
    torch.manual_seed(0)
    redirector = PromptRedirector(RedirectorConfig("flux", 8, 16, 16, 2))
    return {"rotation": make_pack(), "anchors": anchors, "redirector": redirector}


def full_pack(shape, guards) -> SafetyPack:
    wordings = {"named": ["nude", "naked"], "mined": ["unclothed"]}
    return SafetyPack(shape, "nudity", **guards, redirector_meta={"recipe": {"steps": 3}}, wordings=wordings)


def test_every_guard_round_trips_in_one_file(shape, guards, tmp_path):
    full_pack(shape, guards).save(tmp_path / "p.safetensors")
    loaded = load_safety_pack(tmp_path / "p.safetensors")
    assert loaded.guards() == ["rotation", "uvr", "redirector"] and loaded.concept == "nudity"
    assert loaded.wordings == {"named": ["nude", "naked"], "mined": ["unclothed"]}
    assert "mined wordings: unclothed" in loaded.describe()
    for name, block in guards["rotation"].blocks.items():
        assert torch.equal(loaded.rotation.blocks[name].w_img, block.w_img)
    assert torch.equal(loaded.anchors.anchors, guards["anchors"].anchors) and loaded.anchors.threshold == 0.4
    mine, theirs = loaded.redirector.state_dict(), guards["redirector"].state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert loaded.redirector_meta["recipe"] == {"steps": 3}


def test_one_guard_is_a_pack_none_is_not(shape, guards, tmp_path):
    SafetyPack(shape, "c", anchors=guards["anchors"]).save(tmp_path / "uvr.safetensors")
    assert load_safety_pack(tmp_path / "uvr.safetensors").guards() == ["uvr"]
    with pytest.raises(SafetyPackError, match="holds no guard"):
        SafetyPack(shape, "c")


def test_guards_of_another_model_do_not_form_a_pack(shape, guards):
    other = type(shape)(shape.family, shape.double_blocks, shape.single_blocks, shape.heads * 2, shape.head_dim)
    with pytest.raises(SafetyPackError, match="rotations were built for another model .heads"):
        SafetyPack(other, "c", rotation=guards["rotation"])
    with pytest.raises(SafetyPackError, match="redirector was trained on flux, not flux2"):
        SafetyPack(type(shape)("flux2", 2, 2, 4, 8), "c", redirector=guards["redirector"])
    pack = SafetyPack(shape, "c", rotation=guards["rotation"])
    with pytest.raises(SafetyPackError, match="does not fit this model .heads: 4 here, 8"):
        pack.check_model(other)


def rewrite(path, change):
    """Rewrite a safety pack file with `change(tensors, meta)` applied (the hash left as it was)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t, m: t.__setitem__("uvr/anchors", t["uvr/anchors"] * 2), "content hash mismatch"),
        (lambda t, m: m.__setitem__("concept", "other"), "content hash mismatch"),
        (lambda t, m: m.__setitem__("kind", "saferope.pack"), "not a safety pack"),
        (lambda t, m: m.__setitem__("format_version", 99), "format version 99"),
    ],
)
def test_a_changed_file_is_refused(shape, guards, tmp_path, change, words):
    path = tmp_path / "p.safetensors"
    full_pack(shape, guards).save(path)
    rewrite(path, change)
    with pytest.raises(SafetyPackError, match=words):
        load_safety_pack(path)


def test_each_guard_is_validated_by_its_own_checks(shape, guards, tmp_path):
    """A guard whose own validation fails (here scaled rotation bases, re-hashed so the file hash holds) makes the
    pack unloadable, naming the guard and the problem."""

    path = tmp_path / "p.safetensors"
    full_pack(shape, guards).save(path)

    def scale_bases(tensors, meta):
        name = next(k for k in tensors if k.endswith("basis_q"))
        tensors[name] = tensors[name] * 3
        inner = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("rotation/")}
        meta["guards"]["rotation"]["content_hash"] = content_hash(inner, meta["guards"]["rotation"])
        meta["content_hash"] = content_hash(tensors, meta)

    rewrite(path, scale_bases)
    with pytest.raises(SafetyPackError, match=r"\(rotations\).*not orthonormal"):
        load_safety_pack(path)


def test_the_guard_checks_choice_round_trips_and_is_what_the_pack_applies(shape, guards, tmp_path):
    path = tmp_path / "p.safetensors"
    unchecked = full_pack(shape, guards)
    assert unchecked.applied_guards() == ["rotation", "uvr", "redirector"]
    unchecked.applies, unchecked.guard_check = ["redirector"], {"scores": [], "applies": ["redirector"]}
    unchecked.save(path)
    loaded = load_safety_pack(path)
    assert loaded.applied_guards() == ["redirector"] and loaded.guard_check["applies"] == ["redirector"]
    assert "applies: prompt redirector (the guard check left out rotations, UVR)" in loaded.describe()
    with pytest.raises(SafetyPackError, match="not a choice among its guards"):
        SafetyPack(shape, "c", anchors=guards["anchors"], applies=["redirector"])
    with pytest.raises(SafetyPackError, match="applies no guard"):
        SafetyPack(shape, "c", anchors=guards["anchors"], applies=[])
    rewrite(path, lambda t, m: m.__setitem__("applies", ["rotation"]))
    with pytest.raises(SafetyPackError, match="content hash mismatch"):  # the choice is part of the hashed content
        load_safety_pack(path)

    def malformed(tensors, meta):
        meta["applies"] = "redirector"
        meta["content_hash"] = content_hash(tensors, meta)

    rewrite(path, malformed)
    with pytest.raises(SafetyPackError, match="'applies' must list guards"):
        load_safety_pack(path)
