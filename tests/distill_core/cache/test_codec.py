import numpy as np
import pytest
import torch

from distill_core.cache import codec
from distill_core.config import TopKConfig
from distill_core.errors import CacheError
from distill_core.teacher.topk import draw_uniforms, read_targets, sparse_from_logits

TAUS = [1.0, 2.0]


def _meta(cfg: TopKConfig, head: int) -> dict:
    return {"strategy": cfg.strategy, "k": head, "temperature": cfg.temperature, "temperatures": cfg.served_temperatures(),
            "codec": codec.CODEC, "draws": cfg.draws}


def _rows(strategy: str, vocab: int, seed: int = 0, rows: int = 3, positions: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, positions, vocab, generator=gen) * 4
    cfg = TopKConfig(strategy=strategy, k=6, draws=20, temperatures=[2.0])
    uniforms = draw_uniforms(0, np.arange(rows), positions, cfg.draws)
    return logits, cfg, sparse_from_logits(logits, cfg, uniforms)


def _by_id(rows: codec.SparseRows) -> codec.SparseRows:
    """``rows`` with each group's ids ascending (decoding gives them by rank)."""
    groups = codec._groups(rows)
    perm = np.lexsort((rows.ids, np.repeat(np.arange(len(groups)), groups)))
    drawn = codec.drawn_mask(rows).mask
    counts = np.zeros(len(rows.ids), np.int64)
    counts[drawn] = rows.counts
    return codec.SparseRows(rows.head, rows.ids[perm], rows.logits[perm], rows.lse, rows.n_drawn, counts[perm][drawn], rows.tail)


def test_frequent_ids_get_the_small_ranks():
    rows = codec.SparseRows(head=2, ids=np.array([900, 70_000, 900, 5, 900, 70_000]), logits=np.zeros(6, np.float32),
                            lse=np.zeros((3, 1), np.float32), n_drawn=np.zeros(3, np.int64), counts=np.zeros(0, np.int64),
                            tail=np.full((3, 1), -1.0, np.float32))
    ranked, rank, ids_by_rank = codec.by_rank(rows)
    np.testing.assert_array_equal(ids_by_rank, [900, 70_000, 5])
    np.testing.assert_array_equal(ranked.ids, [900, 70_000, 900, 5, 900, 70_000])
    np.testing.assert_array_equal(rank, [0, 1, 0, 2, 0, 1])


def test_varints_round_trip_every_width():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**32 - 1, 2**40], dtype=np.int64)
    data, nbytes = codec.varint_encode(values)
    assert nbytes.tolist() == [1, 1, 1, 2, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(codec.varint_decode(data), values)


def test_truncated_ids_are_refused():
    data, _ = codec.varint_encode(np.array([300], dtype=np.int64))
    with pytest.raises(CacheError, match="truncated"):
        codec.varint_decode(data[:1])


@pytest.mark.parametrize("strategy", ["topk", "sampled", "hybrid"])
@pytest.mark.parametrize("vocab", [300, 70_000, 2**20 + 5])  # ids in uint16 range, and ids that need uint32
def test_round_trip_is_within_the_stated_bound_and_re_encodes_bit_exactly(strategy, vocab):
    logits, cfg, rows = _rows(strategy, vocab)
    seq_ids = np.array([5, 9, 11])
    table = codec.encode_table(seq_ids, rows, TAUS)
    got_seq, back = codec.decode_table(table, rows.head, TAUS)
    np.testing.assert_array_equal(got_seq, seq_ids)
    back = _by_id(back)
    np.testing.assert_array_equal(back.ids, rows.ids)  # ids and counts are exact
    np.testing.assert_array_equal(back.counts, rows.counts)
    np.testing.assert_array_equal(back.n_drawn, rows.n_drawn)
    if vocab > 2**16:
        assert rows.ids.max() > 2**16
    step = codec.quantise(rows, TAUS).step.astype(np.float64)
    pos = np.repeat(np.arange(rows.positions), rows.sizes())
    for tau in TAUS:
        exact = codec.logprobs_at(rows, TAUS, tau).astype(np.float64)
        decoded = codec.logprobs_at(back, TAUS, tau).astype(np.float64)
        lognorm = back.lse[:, TAUS.index(tau)].astype(np.float64)
        bound = step[pos] / (2 * tau) + 2.0**-11 * lognorm[pos] + 1e-5  # + float32 arithmetic
        assert (np.abs(decoded - exact) <= bound).all()
        # and the decoded log-probabilities match the teacher's own at the kept ids
        teacher = torch.log_softmax(logits.reshape(-1, vocab).double() / tau, -1).numpy()[pos, rows.ids]
        assert np.abs(decoded - teacher).max() <= bound.max()
    if rows.tail is not None:
        finite = np.isfinite(rows.tail)
        np.testing.assert_allclose(back.tail[finite], rows.tail[finite], atol=1 / 4096 + 1e-6)
    again = codec.encode_table(seq_ids, codec.decode_table(table, rows.head, TAUS)[1], TAUS)
    assert again.equals(table)
    assert codec.encode_table(seq_ids, back, TAUS).equals(table)  # whatever the order within a group


def test_a_position_whose_kept_logits_are_equal_codes_exactly():
    rows = codec.SparseRows(head=2, ids=np.array([3, 7]), logits=np.array([1.5, 1.5], np.float32),
                            lse=np.array([[2.0, 1.5]], np.float32), n_drawn=np.zeros(1, np.int64),
                            counts=np.zeros(0, np.int64), tail=np.array([[-3.0, -1.0]], np.float32))
    back = codec.decode_table(codec.encode_table(np.array([0]), rows, TAUS), 2, TAUS)[1]
    np.testing.assert_allclose(codec.logprobs_at(back, TAUS, 1.0), [-0.5, -0.5], atol=1e-3)


def test_targets_at_an_unlisted_temperature_are_refused_with_the_list():
    _, cfg, rows = _rows("topk", 300)
    table = codec.encode_table(np.arange(3), rows, TAUS)
    with pytest.raises(CacheError, match=r"serves temperatures \[1.0, 2.0\], not 4.0"):
        read_targets(table, _meta(cfg, rows.head), 4.0)


def test_sampled_targets_hold_counts_over_draws_as_their_mass():
    _, cfg, rows = _rows("sampled", 300)
    _, out = read_targets(codec.encode_table(np.arange(3), rows, TAUS), _meta(cfg, 0), 1.0)
    # at the capture temperature a drawn id's mass is its share of the draws
    np.testing.assert_allclose(out["sparse_mass"].sum(-1), 1.0, atol=1e-5)
    assert out["sparse_ids"].shape == (3, 7, cfg.draws)
    np.testing.assert_array_equal(out["tail_logprob"], 0.0)


def test_hybrid_draws_lie_outside_the_top_k():
    logits, cfg, rows = _rows("hybrid", 300)
    _, out = read_targets(codec.encode_table(np.arange(3), rows, TAUS), _meta(cfg, 6), 1.0)
    top = logits.topk(6, -1).indices.sort(-1).values.numpy()
    np.testing.assert_array_equal(np.sort(out["sparse_ids"][..., :6], -1), top)
    drawn, mass = out["sparse_ids"][..., 6:], out["sparse_mass"][..., 6:]
    in_top = (drawn[..., :, None] == top[..., None, :]).any(-1)
    assert (mass > 0).any() and not (in_top & (mass > 0)).any()
    # the drawn ids share the tail mass at the capture temperature
    np.testing.assert_allclose(mass.sum(-1), np.exp(out["tail_logprob"]), rtol=1e-3)


def test_a_cache_in_a_newer_codec_is_refused_with_the_fix():
    _, cfg, rows = _rows("topk", 300)
    table = codec.encode_table(np.arange(3), rows, TAUS)
    with pytest.raises(CacheError, match="codec 3, which this code .* cannot read: upgrade distillery"):
        read_targets(table, {**_meta(cfg, rows.head), "codec": 3}, 1.0)
