"""Files and inputs that once slipped through (issue "Hardening"): each test fails without its fix."""

import json
import random
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from saferope_core import AnchorsError, SafeRoPEPackError, build_unsafe_prompts, load_pack
from saferope_core.files import METADATA_KEY
from saferope_core.pack import content_hash
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
