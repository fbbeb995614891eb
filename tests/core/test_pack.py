"""The pack file: exact round trip, model checks, applying and stacking packs, and a loader that only ever
raises SafeRoPEPackError (with a message that names the problem) on damaged or foreign files."""

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from saferope_core import ModelShape, SafeRoPEPackError, load_pack, rotate_tokens
from saferope_core.files import METADATA_KEY, content_hash
from saferope_core.pack import PACK_FORMAT_VERSION


def _tokens(shape, seed=0, length=6):
    """Gaussian tokens [1, H, L, D]; at head_dim 8 and rank 3 their LRS is well above 0, so they visibly rotate."""
    return torch.randn(1, shape.heads, length, shape.head_dim, generator=torch.Generator().manual_seed(seed))


# --- round trip -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [None, 0.25])
def test_save_load_round_trip_is_exact(make_pack, tmp_path, gate):
    pack = make_pack(seed=1, gate=gate)
    path = pack.save(tmp_path / "packs" / "concept.safetensors")
    loaded = load_pack(path)
    assert loaded.metadata() == pack.metadata()
    assert loaded.shape == pack.shape and loaded.concepts == pack.concepts and loaded.rank == pack.rank
    assert loaded.thresholds == pack.thresholds and loaded.recipe == pack.recipe
    saved, read = pack.tensors(), loaded.tensors()
    assert set(saved) == set(read)
    for name in saved:
        assert saved[name].dtype == read[name].dtype and torch.equal(saved[name], read[name]), name
    for name, block in pack.blocks.items():
        assert torch.equal(loaded.blocks[name].heads, block.heads)
        assert loaded.blocks[name].heads.dtype == torch.bool
    assert [p.name for p in path.parent.iterdir()] == ["concept.safetensors"]  # atomic write left no temp file


def test_round_trip_without_delta_and_with_trainable_w(make_pack, tmp_path):
    """A pack saved during training (W requires grad) and without the HDS table loads back."""
    pack = make_pack(seed=2)
    pack.delta = None
    for block in pack.blocks.values():
        block.w_txt.requires_grad_()
    loaded = load_pack(pack.save(tmp_path / "p.safetensors"))
    assert loaded.delta is None
    assert torch.equal(loaded.blocks["double.1"].w_txt, pack.blocks["double.1"].w_txt.detach())


def test_loaded_pack_rotates_like_the_original(make_pack, tmp_path):
    pack = make_pack(seed=3, gate=0.2)
    loaded = load_pack(pack.save(tmp_path / "p.safetensors"))
    x = _tokens(pack.shape, seed=4)
    assert torch.equal(loaded.rotate(x, "single.0", "k", "img"), pack.rotate(x, "single.0", "k", "img"))


# --- model check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["family", "double_blocks", "single_blocks", "heads", "head_dim"])
def test_check_model_names_the_mismatching_dimension(make_pack, field):
    pack = make_pack()
    pack.check_model(pack.shape)  # the right model passes
    values = pack.shape.to_dict()
    values[field] = "flux2" if field == "family" else values[field] + 1
    with pytest.raises(SafeRoPEPackError, match=field):
        pack.check_model(ModelShape(**values))


# --- applying -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk", ["q", "k"])
@pytest.mark.parametrize("tokens", ["txt", "img"])
@pytest.mark.parametrize("gate", [None, 0.3])
def test_rotate_touches_only_selected_heads(make_pack, qk, tokens, gate):
    """Selected heads equal rotate_tokens with that block's basis and W; the other heads are bit-identical."""
    pack = make_pack(seed=5, gate=gate)
    x = _tokens(pack.shape, seed=6)
    block = pack.blocks["double.1"]  # heads 0 and 2
    out = pack.rotate(x, "double.1", qk, tokens, strength=0.8)
    index = torch.tensor([0, 2])
    basis = (block.basis_q if qk == "q" else block.basis_k)[index]
    w = (block.w_txt if tokens == "txt" else block.w_img)[index]
    expected = rotate_tokens(x[:, index], basis, w, 0.8, gate)
    assert torch.equal(out[:, index], expected)
    assert not torch.equal(out[:, index], x[:, index])
    assert torch.equal(out[:, [1, 3]], x[:, [1, 3]])
    assert out.shape == x.shape and out.dtype == x.dtype


def test_rotate_uses_separate_text_and_image_rotations(make_pack):
    pack = make_pack(seed=7)
    x = _tokens(pack.shape, seed=8)
    assert not torch.equal(pack.rotate(x, "single.0", "q", "txt"), pack.rotate(x, "single.0", "q", "img"))
    assert not torch.equal(pack.rotate(x, "single.0", "q", "txt"), pack.rotate(x, "single.0", "k", "txt"))


def test_rotate_returns_x_when_nothing_rotates(make_pack):
    """A block without selected heads, strength 0, or a zero pack return x itself."""
    pack = make_pack(seed=9)
    x = _tokens(pack.shape, seed=10)
    assert pack.rotate(x, "double.0", "q", "txt") is x
    assert pack.rotate(x, "double.1", "q", "txt", strength=0) is x
    zero = make_pack(seed=9, scale=0.0)
    assert zero.rotate(x, "double.1", "k", "img") is x


def test_gradient_reaches_only_selected_heads_of_w(make_pack):
    """Training through pack.rotate: W rows of selected heads get gradient, the other rows get exactly zero."""
    pack = make_pack(seed=16)
    block = pack.blocks["double.1"]  # heads 0 and 2
    block.w_txt = torch.zeros_like(block.w_txt, requires_grad=True)
    x = _tokens(pack.shape, seed=17)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(18))
    (pack.rotate(x, "double.1", "k", "txt") * weights).sum().backward()
    grad = block.w_txt.grad
    assert bool(torch.isfinite(grad).all())
    assert grad[[0, 2]].abs().amax(dim=(1, 2)).min() > 1e-3
    assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))


def test_fixed_rotations_are_decomposed_once_per_w(make_pack, monkeypatch):
    """pack.rotate works out the eigen-decomposition of a fixed W once (the same result as working it out per call),
    a copy on a device takes it along, a new W is decomposed again, and a W being trained is decomposed per call."""
    pack = make_pack(seed=19)
    x = _tokens(pack.shape, seed=20)
    block = pack.blocks["double.1"]
    index = block.head_index()
    expected = rotate_tokens(x[:, index], block.basis_q[index], block.w_txt[index], 1.0)  # its own eigh
    calls = []
    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = pack.rotate(x, "double.1", "q", "txt")
    torch.testing.assert_close(first[:, index], expected, rtol=0, atol=1e-6)
    assert len(calls) == 1
    moved = pack.to("cpu")  # decomposes every other W of the pack once, to take it along
    assert len(calls) == 2 * len(pack.blocks)
    for _ in range(3):
        assert torch.equal(pack.rotate(x, "double.1", "q", "txt"), first)
        assert torch.equal(moved.rotate(x, "double.1", "q", "txt"), first)
        assert torch.equal(pack.to("cpu").rotate(x, "double.1", "k", "img"), moved.rotate(x, "double.1", "k", "img"))
    assert len(calls) == 2 * len(pack.blocks), calls
    block.w_txt = block.w_txt * 2
    assert not torch.equal(pack.rotate(x, "double.1", "q", "txt"), first)
    assert len(calls) == 2 * len(pack.blocks) + 1
    block.w_txt = block.w_txt.clone().requires_grad_(True)
    pack.rotate(x, "double.1", "q", "txt")
    pack.rotate(x, "double.1", "q", "txt")
    assert len(calls) == 2 * len(pack.blocks) + 3


def test_two_packs_stack(make_pack):
    """Pack A then pack B differs from either alone, and the composition is still orthogonal."""
    first, second = make_pack(seed=11), make_pack(seed=12)
    x = _tokens(first.shape, seed=13)
    a = first.rotate(x, "double.1", "q", "txt")
    b = second.rotate(x, "double.1", "q", "txt")
    ab = second.rotate(a, "double.1", "q", "txt")
    selected = [0, 2]
    assert not torch.allclose(ab[:, selected], a[:, selected], atol=1e-3)
    assert not torch.allclose(ab[:, selected], b[:, selected], atol=1e-3)
    torch.testing.assert_close(ab.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_to_device_copies(make_pack):
    pack = make_pack(seed=14)
    moved = pack.to("cpu")
    assert moved is not pack and moved.metadata() == pack.metadata()
    assert all(torch.equal(moved.tensors()[k], v) for k, v in pack.tensors().items())
    # new containers: replacing a tensor or a threshold of the copy leaves the original alone
    moved.blocks["double.1"].w_txt = torch.zeros(4, 3, 3)
    moved.thresholds["gate"] = 0.9
    assert pack.blocks["double.1"].w_txt.abs().sum() > 0 and pack.thresholds["gate"] is None


def test_describe_mentions_concept_and_shape(make_pack):
    pack = make_pack(seed=15)
    text = pack.describe()
    assert "test concept" in text and "rank 3" in text and "5 heads in 2 blocks" in text
    assert "for FLUX.1 (dev, schnell, Kontext), 2+2 blocks, 4 heads x 8" in text


@pytest.mark.parametrize("family", ["flux2", "chroma", "chroma_radiance", "ovis"])
def test_check_model_names_both_families(make_pack, family):
    """A pack of one family on a model of another (same sizes) is refused naming both families."""
    pack = make_pack()
    other = ModelShape(**{**pack.shape.to_dict(), "family": family})
    with pytest.raises(
        SafeRoPEPackError,
        match=r"built for FLUX\.1 .*the model is "
        + {"flux2": "FLUX.2", "chroma": "Chroma", "chroma_radiance": "Chroma Radiance", "ovis": "Ovis-Image"}[family],
    ):
        pack.check_model(other)


# --- the loader under fuzzing ---------------------------------------------------------------------------


@pytest.fixture
def parts(make_pack):
    """(tensors, metadata with content hash) of a valid pack, to be damaged by the tests."""
    pack = make_pack(seed=20)
    tensors, meta = pack.tensors(), pack.metadata()
    meta["content_hash"] = content_hash(tensors, meta)
    return tensors, meta


def _write(path, tensors, meta, sign=True):
    """Write a pack-like file; `sign` recomputes the content hash so only the intended damage remains."""
    meta = dict(meta) if isinstance(meta, dict) else meta
    if sign and isinstance(meta, dict):
        meta["content_hash"] = content_hash(tensors, meta)
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: raw})
    return path


def _refused(path, *words):
    """load_pack raises SafeRoPEPackError (nothing else) whose message holds every word (case-insensitive)."""
    try:
        load_pack(path)
    except SafeRoPEPackError as err:
        message = str(err).lower()
        for word in words:
            assert word.lower() in message, f"{word!r} not in {str(err)!r}"
        return str(err)
    except BaseException as err:  # noqa: B036 - any other exception type is the failure we look for
        pytest.fail(f"load_pack raised {type(err).__name__}: {err}")
    pytest.fail(f"load_pack accepted {path}")


def test_valid_file_loads(parts, tmp_path):
    """The fixture itself is a valid file (so every refusal below is caused by the damage)."""
    tensors, meta = parts
    assert load_pack(_write(tmp_path / "ok.safetensors", tensors, meta)).rank == meta["rank"]


def test_missing_file_and_directory(tmp_path):
    _refused(tmp_path / "absent.safetensors", "not found")
    _refused(tmp_path, "not found")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello world\n",
        b'{"a": 1}',
        b"\x89PNG\r\n\x1a\n" + bytes(100),
        (2**63).to_bytes(8, "little") + b"{}",
        (16).to_bytes(8, "little") + b'{"x": {"dtype"',
        (2).to_bytes(8, "little") + b"{}",
    ],
)
def test_non_safetensors_files(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    _refused(path, "safetensors")


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "pickle.safetensors"
    torch.save({"double.1.w_txt": torch.zeros(4, 3, 3)}, path)
    _refused(path, "safetensors")


def test_random_bytes(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "random.safetensors"
    for i in range(300):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        if i % 2:  # a plausible header length in front, so the parser goes further
            body = rng.randrange(1, 200).to_bytes(8, "little") + body
        path.write_bytes(body)
        _refused(path, "safetensors")


def test_truncated_at_every_offset(make_pack, tmp_path):
    data = make_pack(seed=21).save(tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    for size in range(len(data)):
        path.write_bytes(data[:size])
        _refused(path, "safetensors")


def test_single_bit_flips(make_pack, tmp_path):
    """A flipped bit anywhere is refused (or, if harmless, the file loads to the same pack)."""
    pack = make_pack(seed=22)
    data = pack.save(tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "flip.safetensors"
    rng = random.Random(1)
    for _ in range(300):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_pack(path)
        except SafeRoPEPackError:
            continue
        assert loaded.metadata() == pack.metadata()
        assert all(torch.equal(loaded.tensors()[k], v) for k, v in pack.tensors().items())


def test_safetensors_without_pack_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"double.1.w_txt": torch.zeros(4, 3, 3)}, str(path))
    _refused(path, "metadata")
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "pt"})
    _refused(path, "metadata")


def test_metadata_is_not_a_json_object(parts, tmp_path):
    tensors, _ = parts
    _refused(_write(tmp_path / "a.safetensors", tensors, "{not json"), "json")
    _refused(_write(tmp_path / "b.safetensors", tensors, "[1, 2, 3]"), "json object")


@pytest.mark.parametrize("kind", ["saferope.statistics", None, 3])
def test_wrong_kind(parts, tmp_path, kind):
    tensors, meta = parts
    _refused(_write(tmp_path / "k.safetensors", tensors, {**meta, "kind": kind}), "not a saferope pack")


@pytest.mark.parametrize("version", [PACK_FORMAT_VERSION + 1, 0, "1", None, 1.5])
def test_wrong_format_version(parts, tmp_path, version):
    tensors, meta = parts
    _refused(_write(tmp_path / "v.safetensors", tensors, {**meta, "format_version": version}), "version")


def test_missing_format_version(parts, tmp_path):
    tensors, meta = parts
    meta = {k: v for k, v in meta.items() if k != "format_version"}
    _refused(_write(tmp_path / "v.safetensors", tensors, meta), "version")


@pytest.mark.parametrize("field", ["model", "concepts", "rank", "thresholds", "recipe", "blocks", "content_hash"])
def test_missing_metadata_field(parts, tmp_path, field):
    tensors, meta = parts
    meta = {k: v for k, v in meta.items() if k != field}
    path = _write(tmp_path / "m.safetensors", tensors, meta, sign=field != "content_hash")  # signing adds a hash
    _refused(path, "missing", field)


@pytest.mark.parametrize(
    "model, word",
    [
        ("flux", "model shape"),
        ({"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": 4}, "head_dim"),
        ({"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": "four", "head_dim": 8}, "model shape"),
        ({"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": None, "head_dim": 8}, "model shape"),
        ({"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": 0, "head_dim": 8}, "impossible"),
        ({"family": "flux", "double_blocks": -1, "single_blocks": 2, "heads": 4, "head_dim": 8}, "impossible"),
        ({"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": 5, "head_dim": 8}, "shape"),
        ({"family": "flux", "double_blocks": 2, "single_blocks": 2, "heads": 4, "head_dim": 16}, "shape"),
        ({"family": "flux", "double_blocks": 1, "single_blocks": 2, "heads": 4, "head_dim": 8}, "does not exist"),
    ],
)
def test_wrong_model_metadata(parts, tmp_path, model, word):
    tensors, meta = parts
    _refused(_write(tmp_path / "s.safetensors", tensors, {**meta, "model": model}), word)


@pytest.mark.parametrize("rank", [0, 9, -3, 2.5, "3", None, [3]])
def test_wrong_rank(parts, tmp_path, rank):
    tensors, meta = parts
    _refused(_write(tmp_path / "r.safetensors", tensors, {**meta, "rank": rank}), "rank")


def test_rank_that_disagrees_with_tensors(parts, tmp_path):
    tensors, meta = parts
    _refused(_write(tmp_path / "r.safetensors", tensors, {**meta, "rank": 2}), "shape")


@pytest.mark.parametrize(
    "field, value, word",
    [
        ("concepts", "nudity", "concepts"),
        ("concepts", [1, 2], "concepts"),
        ("thresholds", [0.7], "thresholds"),
        ("recipe", "trained", "recipe"),
        ("thresholds", {"lrs": 0.7, "hds": 0.5, "gate": "high"}, "gate"),
        ("blocks", ["double.7"], "does not exist"),
        ("blocks", ["triple.0"], "does not exist"),
        ("blocks", 5, "malformed"),
        ("blocks", None, "malformed"),
        ("blocks", [["double.1"]], "does not exist"),
    ],
)
def test_wrong_metadata_fields(parts, tmp_path, field, value, word):
    tensors, meta = parts
    _refused(_write(tmp_path / "f.safetensors", tensors, {**meta, field: value}), word)


@pytest.mark.parametrize(
    "name, bad_shape",
    [
        ("double.1.basis_q", (4, 8, 2)),
        ("double.1.basis_k", (4, 3, 8)),
        ("single.0.heads", (3,)),
        ("single.0.w_txt", (4, 3, 2)),
        ("single.0.w_img", (3, 3)),
        ("hds.delta", (4, 5)),
        ("hds.delta", (16,)),
    ],
)
def test_wrong_tensor_shape(parts, tmp_path, name, bad_shape):
    tensors, meta = parts
    dtype = torch.uint8 if name.endswith("heads") else torch.float32
    tensors = {**tensors, name: torch.ones(bad_shape, dtype=dtype)}
    _refused(_write(tmp_path / "t.safetensors", tensors, meta), "shape", name)


@pytest.mark.parametrize("name", ["double.1.basis_q", "double.1.basis_k", "single.0.w_txt", "single.0.w_img"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor(parts, tmp_path, name, value):
    tensors, meta = parts
    damaged = tensors[name].clone()
    damaged.view(-1)[5] = value
    _refused(_write(tmp_path / "n.safetensors", {**tensors, name: damaged}, meta), "nan", name)


def test_non_finite_delta_table(parts, tmp_path):
    tensors, meta = parts
    delta = tensors["hds.delta"].clone()
    delta[0, 0] = float("nan")
    _refused(_write(tmp_path / "n.safetensors", {**tensors, "hds.delta": delta}, meta), "nan")


def test_pack_without_blocks(parts, tmp_path):
    """A file that lists no block (and holds only the HDS table) rotates nothing and is refused."""
    tensors, meta = parts
    _refused(
        _write(tmp_path / "b.safetensors", {"hds.delta": tensors["hds.delta"]}, {**meta, "blocks": []}), "no block"
    )


@pytest.mark.parametrize("gate", [float("nan"), 1.5])
def test_gate_outside_the_lrs_range(parts, tmp_path, gate):
    """LRS lies in [0, 1]: a NaN gate or a gate above 1 would rotate nothing, so the file is refused."""
    tensors, meta = parts
    thresholds = {**meta["thresholds"], "gate": gate}
    _refused(_write(tmp_path / "g.safetensors", tensors, {**meta, "thresholds": thresholds}), "gate")


def test_integer_delta_table_names_the_dtype(parts, tmp_path):
    tensors, meta = parts
    tensors = {**tensors, "hds.delta": torch.ones(4, 4, dtype=torch.int64)}
    _refused(_write(tmp_path / "d.safetensors", tensors, meta), "dtype", "hds.delta")


def test_integer_tensor_where_float_expected(parts, tmp_path):
    tensors, meta = parts
    tensors = {**tensors, "double.1.w_txt": torch.zeros(4, 3, 3, dtype=torch.int32)}
    _refused(_write(tmp_path / "i.safetensors", tensors, meta), "dtype", "double.1.w_txt")


def test_block_without_selected_heads(parts, tmp_path):
    tensors, meta = parts
    tensors = {**tensors, "single.0.heads": torch.zeros(4, dtype=torch.uint8)}
    _refused(_write(tmp_path / "h.safetensors", tensors, meta), "no head")


@pytest.mark.parametrize("name", ["double.1.basis_k", "single.0.heads", "single.0.w_img"])
def test_missing_tensor(parts, tmp_path, name):
    tensors, meta = parts
    tensors = {k: v for k, v in tensors.items() if k != name}
    _refused(_write(tmp_path / "m.safetensors", tensors, meta), "missing", name)


@pytest.mark.parametrize("name", ["double.0.w_txt", "notes", "hds.delta2"])
def test_extra_tensor(parts, tmp_path, name):
    tensors, meta = parts
    _refused(_write(tmp_path / "e.safetensors", {**tensors, name: torch.zeros(2)}, meta), "unexpected", name)


def test_hash_mismatch_after_editing_a_tensor(parts, tmp_path):
    tensors, meta = parts
    edited = tensors["single.0.w_txt"].clone()
    edited[1, 0, 1] += 1e-3
    _refused(_write(tmp_path / "h.safetensors", {**tensors, "single.0.w_txt": edited}, meta, sign=False), "hash")


@pytest.mark.parametrize(
    "field, value",
    [("concepts", ["other"]), ("recipe", {"trained": False}), ("content_hash", "0" * 64), ("content_hash", 12)],
)
def test_hash_mismatch_after_editing_metadata(parts, tmp_path, field, value):
    tensors, meta = parts
    _refused(_write(tmp_path / "h.safetensors", tensors, {**meta, field: value}, sign=False), "hash")


def test_hash_covers_dtype(parts, tmp_path):
    """Same bytes read as another dtype (float16 -> bfloat16) without re-signing is a hash mismatch."""
    tensors, meta = parts
    tensors = {**tensors, "double.1.w_img": tensors["double.1.w_img"].half()}
    path = _write(tmp_path / "h.safetensors", tensors, meta)
    assert load_pack(path).blocks["double.1"].w_img.dtype == torch.float32  # a float16 pack is fine
    tensors["double.1.w_img"] = tensors["double.1.w_img"].view(torch.bfloat16)
    meta = {
        **meta,
        "content_hash": content_hash(
            {**tensors, "double.1.w_img": tensors["double.1.w_img"].view(torch.float16)}, meta
        ),
    }
    _refused(_write(tmp_path / "h.safetensors", tensors, meta, sign=False), "hash")


def test_rank_one_pack_saves_and_loads(shape, tmp_path):
    """Rank 1 (Build Subspaces allows it): a [heads, head_dim, 1] basis can carry a stride of its last dimension that
    torch calls contiguous and a byte view refuses; saving (content hash) and loading must still work."""
    from saferope_core import BlockRotation, SafeRoPEPack

    g = torch.Generator().manual_seed(0)
    h, d = shape.heads, shape.head_dim
    basis = torch.nn.functional.normalize(torch.randn(h, 1, d, generator=g), dim=-1).transpose(1, 2)
    assert basis.is_contiguous() and basis.stride(-1) != 1
    w = torch.zeros(h, 1, 1)
    rotation = BlockRotation(basis, basis.clone(), torch.ones(h, dtype=torch.bool), w, w.clone())
    pack = SafeRoPEPack(shape, ["c"], 1, {"double.0": rotation}, name="rank1")
    pack.save(tmp_path / "rank1.safetensors")
    loaded = load_pack(tmp_path / "rank1.safetensors")
    assert torch.equal(loaded.blocks["double.0"].basis_q, basis)
