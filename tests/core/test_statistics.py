"""Streaming q/k statistics: Gram matrices, counts, reservoirs, merging, fixed memory, save/load."""

import pytest
import torch

from saferope_core import ModelShape, QKStatistics, site_name

SITE = "double.0.txt.q"


def _vectors(n: int, shape: ModelShape, seed: int) -> torch.Tensor:
    return torch.randn(n, shape.heads, shape.head_dim, generator=torch.Generator().manual_seed(seed))


def _rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    """Every row [H, D] of `rows` is bit-identical to some row of `pool`."""
    flat_rows, flat_pool = rows.flatten(1), pool.flatten(1)
    return bool((flat_rows[:, None, :] == flat_pool[None, :, :]).all(-1).any(-1).all())


def test_site_name_validates_stream_and_qk():
    assert site_name("single.3", "img", "k") == "single.3.img.k"
    with pytest.raises(ValueError):
        site_name("double.0", "image", "q")
    with pytest.raises(ValueError):
        site_name("double.0", "txt", "v")


def test_add_rejects_wrong_shapes_and_groups(shape):
    stats = QKStatistics(shape)
    with pytest.raises(ValueError, match="heads"):
        stats.add("unsafe", SITE, torch.zeros(3, shape.heads + 1, shape.head_dim))
    with pytest.raises(ValueError, match="group"):
        stats.add("neutral", SITE, torch.zeros(3, shape.heads, shape.head_dim))
    with pytest.raises(ValueError):
        QKStatistics(shape, reservoir_size=0)


def test_gram_and_count_accumulate(shape):
    """Gram = sum over all added vectors of v v^T per head; the count is the number of vectors."""
    stats = QKStatistics(shape, reservoir_size=4)
    a, b = _vectors(7, shape, 1), _vectors(5, shape, 2)
    stats.add("unsafe", SITE, a)
    stats.add("unsafe", SITE, b)
    stats.add("unsafe", SITE, a[:0])  # an empty batch changes nothing
    both = torch.cat([a, b])
    expected = torch.einsum("nhd,nhe->hde", both, both)
    key = QKStatistics.key("unsafe", SITE)
    torch.testing.assert_close(stats.gram[key], expected)
    assert stats.count[key] == 12
    assert stats.sites("unsafe") == [SITE] and stats.sites("safe") == []


def test_reservoir_is_bounded_and_drawn_from_the_data(shape):
    stats = QKStatistics(shape, reservoir_size=6, seed=3)
    data = _vectors(50, shape, 4)
    for chunk in data.split(7):
        stats.add("safe", SITE, chunk)
    res = stats.reservoir[QKStatistics.key("safe", SITE)]
    assert res.shape == (6, shape.heads, shape.head_dim)
    assert _rows_in(res, data)
    assert len({tuple(r.flatten().tolist()) for r in res}) == 6  # no vector twice


def test_reservoir_keeps_everything_below_capacity(shape):
    stats = QKStatistics(shape, reservoir_size=100)
    data = _vectors(30, shape, 5)
    stats.add("unsafe", SITE, data[:10])
    stats.add("unsafe", SITE, data[10:])
    assert torch.equal(stats.reservoir[QKStatistics.key("unsafe", SITE)], data)


@pytest.mark.parametrize("chunk", [1, 13, 1000])
def test_reservoir_is_a_uniform_sample(chunk):
    """Each of N items lands in the reservoir with probability k/N, whatever the chunking (chi-square check)."""
    tiny = ModelShape("flux", 1, 0, 1, 1)
    n, k, trials = 60, 6, 300
    items = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1)
    hits = torch.zeros(n)
    for seed in range(trials):
        stats = QKStatistics(tiny, reservoir_size=k, seed=seed)
        for part in items.split(chunk):
            stats.add("unsafe", SITE, part)
        kept = stats.reservoir[QKStatistics.key("unsafe", SITE)].flatten().long()
        assert kept.unique().numel() == k
        hits[kept] += 1
    p = k / n
    expected = trials * p
    chi2 = float(((hits - expected) ** 2 / (trials * p * (1 - p))).sum())
    dof = n - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, f"chi-square {chi2:.1f} for {dof} degrees of freedom"
    # no order bias: the first and the last third are kept about equally often
    third = n // 3
    assert abs(float(hits[:third].mean() - hits[-third:].mean())) < 0.15 * expected


def test_nbytes_does_not_grow_with_vectors(shape):
    """Memory is fixed by shape and reservoir size, not by the number of vectors added."""
    stats = QKStatistics(shape, reservoir_size=16)
    stats.add("unsafe", SITE, _vectors(16, shape, 0))
    stats.add("safe", SITE, _vectors(16, shape, 1))
    full = stats.nbytes()
    assert full > 0
    for seed in range(2, 22):
        stats.add("unsafe", SITE, _vectors(200, shape, seed))
        stats.add("safe", SITE, _vectors(50, shape, seed + 100))
    assert stats.nbytes() == full
    assert stats.count[QKStatistics.key("unsafe", SITE)] == 16 + 20 * 200


@pytest.mark.parametrize("cap", [8, 1000])
def test_merge_equals_one_pass(shape, cap):
    """Merging two collections gives the Gram matrices and counts of one pass over all the data."""
    other_site = "single.1.img.k"
    a, b = _vectors(40, shape, 10), _vectors(25, shape, 11)
    first, second, whole = (QKStatistics(shape, reservoir_size=cap, seed=s) for s in (1, 2, 3))
    first.add("unsafe", SITE, a)
    first.add("safe", other_site, a[:5])  # a key only the first collection has
    second.add("unsafe", SITE, b)
    whole.add("unsafe", SITE, a)
    whole.add("unsafe", SITE, b)
    whole.add("safe", other_site, a[:5])

    merged = first.merged(second)
    assert merged.count == whole.count
    for key in whole.gram:
        torch.testing.assert_close(merged.gram[key], whole.gram[key], rtol=1e-5, atol=1e-4)
    res = merged.reservoir[QKStatistics.key("unsafe", SITE)]
    assert res.shape[0] == min(cap, 65)
    assert _rows_in(res, torch.cat([a, b]))
    only_first = merged.reservoir[QKStatistics.key("safe", other_site)]  # all 5 vectors, in any order
    assert only_first.shape[0] == 5 and _rows_in(only_first, a[:5]) and _rows_in(a[:5], only_first)


def test_merged_reservoir_is_bounded_and_proportional(shape):
    """Both reservoirs full: the merged one keeps the smaller capacity, shared in proportion to the counts."""
    a, b = _vectors(300, shape, 20), _vectors(100, shape, 21)
    first, second = QKStatistics(shape, reservoir_size=8, seed=1), QKStatistics(shape, reservoir_size=12, seed=2)
    first.add("unsafe", SITE, a)
    second.add("unsafe", SITE, b)
    res = first.merged(second).reservoir[QKStatistics.key("unsafe", SITE)]
    assert res.shape[0] == 8
    from_a = sum(_rows_in(r[None], a) for r in res)
    from_b = sum(_rows_in(r[None], b) for r in res)
    assert from_a + from_b == 8
    assert abs(from_a - 6) <= 1  # 300 / 400 of 8


def test_merge_joins_concepts_without_duplicates(shape):
    first = QKStatistics(shape, concepts=["nudity", "gore"])
    second = QKStatistics(shape, concepts=["gore", "van_gogh"])
    assert first.merged(second).concepts == ["nudity", "gore", "van_gogh"]
    assert first.concepts == ["nudity", "gore"]  # the inputs are left alone


def test_merge_refuses_a_different_model(shape):
    other = ModelShape(shape.family, shape.double_blocks, shape.single_blocks, shape.heads, shape.head_dim * 2)
    with pytest.raises(ValueError, match="head_dim"):
        QKStatistics(shape).merged(QKStatistics(other))


def test_save_load_round_trip(shape, tmp_path):
    stats = QKStatistics(shape, reservoir_size=5, seed=7, concepts=["nudity", "gore"])
    stats.add("unsafe", SITE, _vectors(9, shape, 1))
    stats.add("safe", "single.0.img.k", _vectors(3, shape, 2))
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path)
    loaded = QKStatistics.load(path)
    assert loaded.shape == shape
    assert (loaded.reservoir_size, loaded.seed, loaded.concepts) == (5, 7, ["nudity", "gore"])
    assert loaded.count == stats.count
    assert set(loaded.gram) == set(stats.gram) and set(loaded.reservoir) == set(stats.reservoir)
    for key in stats.gram:
        assert torch.equal(loaded.gram[key], stats.gram[key])
        assert torch.equal(loaded.reservoir[key], stats.reservoir[key])
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]  # no temp file left behind


def test_load_rejects_other_files(shape, tmp_path, make_pack):
    """A pack file, a non-safetensors file and a missing file are refused with ValueError."""
    pack_path = make_pack().save(tmp_path / "pack.safetensors")
    with pytest.raises(ValueError, match="statistics"):
        QKStatistics.load(pack_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="safetensors"):
        QKStatistics.load(junk)
    with pytest.raises(ValueError, match="not found"):
        QKStatistics.load(tmp_path / "absent.safetensors")
