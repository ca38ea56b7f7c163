import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.sinkhorn import sinkhorn_balanced, sinkhorn_per_sample, sinkhorn_transport_plan


def test_balanced_rows_are_distributions_and_prototypes_share_the_batch():
    torch.manual_seed(0)
    scores = 2 * torch.rand(392, 200, dtype=torch.float64) - 1  # TimeT: 2 clips x 196 patches, 200 prototypes
    q = sinkhorn_balanced(scores, epsilon=0.05, iterations=10)
    assert q.shape == (392, 200) and q.dtype == torch.float64  # float64 scores stay float64 (parity tests)
    assert sinkhorn_balanced(scores.float(), epsilon=0.05, iterations=10).dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(392, dtype=torch.float64), atol=1e-5, rtol=0)
    # Ten iterations are not converged: each prototype holds close to, not exactly, 392 / 200 rows.
    mass = q.sum(0)
    assert torch.allclose(mass, torch.full((200,), 392 / 200, dtype=torch.float64), rtol=0.5)
    assert mass.std() < torch.softmax(scores / 0.05, 1).sum(0).std() / 5  # far more balanced than softmax


def test_balanced_converges_to_exact_equipartition():
    torch.manual_seed(1)
    scores = 2 * torch.rand(60, 6, dtype=torch.float64) - 1
    q = sinkhorn_balanced(scores, epsilon=0.5, iterations=500)
    torch.testing.assert_close(q.sum(0).double(), torch.full((6,), 10.0, dtype=torch.float64), atol=1e-4, rtol=0)


def test_per_sample_balances_each_sample_separately_and_survives_large_logits():
    torch.manual_seed(0)
    # DoRA's prototypes are not normalised: logits / 0.05 reach ~800, where exp() overflows without the
    # max-subtraction. Object 0 is favoured: a softmax gives it ~3/4 of the patches.
    logits = 40 + 0.2 * torch.randn(2, 196, 3, dtype=torch.float64)
    logits[..., 0] += 0.3
    assert not torch.isfinite(torch.exp(logits / 0.05)).all()
    assert (torch.softmax(logits / 0.05, -1).sum(1)[:, 0] > 140).all()
    q = sinkhorn_per_sample(logits, epsilon=0.05, iterations=30)
    assert q.shape == (2, 196, 3) and torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(2), torch.ones(2, 196, dtype=torch.float64), atol=1e-6, rtol=0)
    # The last normalisation is per patch, so each object's mass is close to 196 / 3, sample by sample.
    assert torch.allclose(q.sum(1), torch.full((2, 3), 196 / 3, dtype=torch.float64), rtol=1e-3)


def test_transport_plan_has_the_target_marginal_and_prefers_cheap_pairs():
    torch.manual_seed(0)
    cost = torch.rand(3, 5, 7, dtype=torch.float64)
    source, target = torch.rand(3, 5, dtype=torch.float64) + 0.1, torch.rand(3, 7, dtype=torch.float64) + 0.1
    plan = sinkhorn_transport_plan(cost, source, target, epsilon=0.05, iterations=3)
    torch.testing.assert_close(plan.sum(1), target / target.sum(-1, keepdim=True))  # exact after the b-update
    converged = sinkhorn_transport_plan(cost, source, target, epsilon=0.5, iterations=300)
    torch.testing.assert_close(converged.sum(2), source / source.sum(-1, keepdim=True))
    # Hand check of one round: a = mu / K 1, b = nu / K^T a.
    kernel = torch.exp(-cost / 0.05)
    mu, nu = source / source.sum(-1, keepdim=True), target / target.sum(-1, keepdim=True)
    a = mu / kernel.sum(-1)
    b = nu / (kernel * a[..., None]).sum(1)
    torch.testing.assert_close(sinkhorn_transport_plan(cost, source, target, 0.05, 1), a[..., None] * kernel * b[:, None])


def _balanced_on_two_ranks(rank: int, port: int, scores: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = len(scores) // 2
        out[rank] = sinkhorn_balanced(scores[rank * half:(rank + 1) * half], 0.05, 10)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_balanced_over_two_ranks_equals_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    scores = 2 * torch.rand(64, 10, dtype=torch.float64) - 1
    out = mp.Manager().dict()
    mp.spawn(_balanced_on_two_ranks, args=(29531, scores, out), nprocs=2)
    torch.testing.assert_close(torch.cat([out[0], out[1]]), sinkhorn_balanced(scores, 0.05, 10))
