"""Files and inputs that once slipped through (issue "Hardening"): each test fails without its fix."""

import json
import random
import time
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saferope_core import (
    AnchorsError,
    QKStatistics,
    SafeRoPEPackError,
    StatisticsError,
    build_unsafe_prompts,
    load_pack,
)
from saferope_core.files import METADATA_KEY, content_hash
from saferope_core.uvr import UVRAnchors


def _write_pack(path, tensors, meta):
    meta = {**meta, "content_hash": content_hash(tensors, meta)}  # a correct hash: only the damage remains
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


@pytest.mark.parametrize("scale", [1e20, 1000.0, 1.01])
def test_scaled_bases_are_refused(make_pack, tmp_path, scale):
    """Item 4: finite bases with a valid hash but not orthonormal (scaled) are refused, naming the tensor."""
    pack = make_pack(seed=3)
    tensors = pack.tensors()
    tensors["double.1.basis_k"] = tensors["double.1.basis_k"] * scale
    with pytest.raises(SafeRoPEPackError, match="double.1.basis_k' is not orthonormal"):
        load_pack(_write_pack(tmp_path / "scaled.safetensors", tensors, pack.metadata()))


def test_orthonormal_bases_load(make_pack, tmp_path):
    pack = make_pack(seed=3)
    assert load_pack(_write_pack(tmp_path / "ok.safetensors", pack.tensors(), pack.metadata())).rank == pack.rank


def _anchors(shape, block="single.1", threshold=0.3, sigma_start=0.85):
    anchors = torch.nn.functional.normalize(torch.randn(shape.heads, 2, shape.head_dim), dim=-1)
    return UVRAnchors(shape, block, anchors, torch.zeros(shape.heads, shape.head_dim), threshold, sigma_start, ["x"])


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("block", "single.99", "not a single block"),
        ("block", "double.0", "not a single block"),
        ("threshold", float("nan"), "finite"),
        ("threshold", 5.0, "finite"),
        ("sigma_start", float("inf"), "finite"),
    ],
)
def test_anchor_files_are_validated(shape, tmp_path, field, value, words):
    """Item 5: an anchors file whose detection block does not exist, or whose threshold is not a finite score, is
    refused when it is loaded (before it could make Restrict Unsafe Flow do nothing)."""
    path = tmp_path / "anchors.safetensors"
    _anchors(shape, **{field: value}).save(path)
    with pytest.raises(AnchorsError, match=words):
        UVRAnchors.load(path)
    good = tmp_path / "good.safetensors"
    _anchors(shape).save(good)
    assert UVRAnchors.load(good).block == "single.1"


def test_prompt_combinations_are_sampled_without_the_product():
    """Item 6: 300 x 300 x 300 lines make 27 million combinations; sampling 10 takes no time and no memory (the
    product is never built), and the sample is the same as the one taken from the full product."""
    subjects, modifiers, templates = ([f"{k}{i}" for i in range(300)] for k in ("s", "m", "t {subject} {modifier}"))
    tracemalloc.start()
    start = time.perf_counter()
    prompts = build_unsafe_prompts(subjects, modifiers, templates, max_count=10, seed=4)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(prompts) == 10 and seconds < 2 and peak < 50 * 2**20
    small = build_unsafe_prompts(subjects[:4], modifiers[:3], templates[:2], max_count=5, seed=4)
    product = [(s, m, t) for s in subjects[:4] for m in modifiers[:3] for t in templates[:2]]
    picks = sorted(random.Random(4).sample(range(len(product)), 5))
    assert [p.text for p in small] == [
        t.replace("{subject}", s).replace("{modifier}", m) for s, m, t in (product[i] for i in picks)
    ]


def test_deeply_nested_metadata_is_a_pack_error(tmp_path):
    """Item 10: metadata JSON nested deeper than Python's recursion limit is refused as a damaged pack."""
    path = tmp_path / "nested.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={METADATA_KEY: "[" * 100000 + "]" * 100000})
    with pytest.raises(SafeRoPEPackError, match="malformed metadata JSON"):
        load_pack(path)


def _statistics(shape):
    stats = QKStatistics(shape, reservoir_size=4, seed=0, concepts=["x"])
    stats.add("unsafe", "double.0.txt.q", torch.randn(6, shape.heads, shape.head_dim))
    return stats


@pytest.mark.parametrize(
    "make, load, error",
    [("statistics", QKStatistics.load, StatisticsError), ("anchors", UVRAnchors.load, AnchorsError)],
)
def test_statistics_and_anchor_files_are_hashed(shape, tmp_path, make, load, error):
    """Statistics and anchors files carry the content hash every file of the pack carries: one changed after it was
    written is refused; one written before December 2026 (no hash at all) still loads."""
    path = tmp_path / f"{make}.safetensors"
    (_statistics(shape) if make == "statistics" else _anchors(shape)).save(path)
    tensors, meta = load_file(str(path)), json.loads(safe_open(str(path), "pt").metadata()[METADATA_KEY])
    assert meta["content_hash"] == content_hash(tensors, meta)
    load(path)

    name = next(iter(tensors))
    changed = {**tensors, name: tensors[name] + 1}
    save_file(changed, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(error, match="content hash mismatch"):
        load(path)

    unhashed = {k: v for k, v in meta.items() if k != "content_hash"}
    save_file(changed, str(path), metadata={METADATA_KEY: json.dumps(unhashed)})
    load(path)
