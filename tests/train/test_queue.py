import torch

from train.queue import FeatureQueue


def test_queue_is_fifo_and_keeps_the_newest_rows():
    queue = FeatureQueue(size=5, dim=2)
    assert not queue.full and queue.contents().shape == (0, 2)
    rows = torch.arange(16.0).view(8, 2)
    queue.push(rows[:3])
    torch.testing.assert_close(queue.contents(), rows[:3])
    queue.push(rows[3:7])  # wraps: rows 0 and 1 are dropped
    assert queue.full
    torch.testing.assert_close(queue.contents(), rows[2:7])
    queue.push(torch.arange(100.0, 114.0).view(7, 2))  # more rows than the queue holds
    torch.testing.assert_close(queue.contents(), torch.arange(104.0, 114.0).view(5, 2))


def test_queue_state_round_trips_through_a_state_dict():
    queue = FeatureQueue(size=4, dim=3)
    queue.push(torch.randn(6, 3))
    restored = FeatureQueue(size=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    torch.testing.assert_close(restored.contents(), queue.contents())
    assert int(restored.count) == 6
