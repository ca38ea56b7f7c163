import numpy as np
import pytest

from pipeline.sampling import EpochOrder, clip_span, draw_start, frame_indices, sample_rng


@pytest.mark.parametrize("num_samples,world_size", [(10, 1), (10, 3), (7, 4), (64, 8)])
def test_ranks_are_disjoint_and_cover_every_epoch(num_samples, world_size):
    for epoch in range(3):
        parts = [EpochOrder(num_samples, r, world_size, seed=5).epoch(epoch) for r in range(world_size)]
        joined = np.concatenate(parts)
        assert len(joined) == num_samples and sorted(joined.tolist()) == list(range(num_samples))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_epochs_reshuffle_and_seed_fixes_the_order():
    a, b = EpochOrder(50, 0, 2, seed=1), EpochOrder(50, 0, 2, seed=1)
    assert np.array_equal(a.epoch(0), b.epoch(0))
    assert not np.array_equal(a.epoch(0), a.epoch(1))
    assert not np.array_equal(a.epoch(0), EpochOrder(50, 0, 2, seed=2).epoch(0))
    assert np.array_equal(EpochOrder(6, 0, 1, seed=1, shuffle=False).epoch(3), np.arange(6))


def test_locate_walks_the_stream_across_epochs():
    order = EpochOrder(7, 1, 2, seed=0)           # rank 1 of 2 reads 3 samples per epoch
    assert order.epoch_length == 3
    got = [order.locate(p) for p in range(7)]
    assert [(e, i) for e, i, _ in got] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [s for *_, s in got[:3]] == order.epoch(0).tolist()


def test_too_few_samples_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        EpochOrder(3, 0, 4, seed=0)


@pytest.mark.parametrize("frames,stride,nframes", [(4, 3, 10), (8, 4, 29), (1, 1, 1), (2, 5, 40)])
def test_starts_stay_inside_the_sample_and_reach_both_ends(frames, stride, nframes):
    span = clip_span(frames, stride)
    rng = np.random.default_rng(0)
    starts = np.array([draw_start(rng, nframes, frames, stride) for _ in range(2000)])
    assert (starts >= 0).all() and (starts + span <= nframes).all()
    assert starts.min() == 0 and starts.max() == nframes - span
    assert frame_indices(3, frames, stride).tolist() == [3 + k * stride for k in range(frames)]


def test_sample_rng_is_keyed_by_position():
    draw = lambda *key: sample_rng(*key).random(4).tolist()  # noqa: E731
    assert draw(0, 0, 1, 5) == draw(0, 0, 1, 5)
    assert len({tuple(draw(0, 0, 1, 5)), tuple(draw(0, 1, 1, 5)), tuple(draw(0, 0, 2, 5)),
                tuple(draw(0, 0, 1, 6)), tuple(draw(0, 0, 1, 5, 1))}) == 5
