"""CRW and DINO losses against closed forms and against their definitions computed by hand."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from train.objectives.crw import crw_loss
from train.objectives.dino import dino_loss, entropy, teacher_targets, teacher_temperature


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ---------------------------------------------------------------- CRW


@pytest.mark.parametrize("frames,nodes", [(3, 9), (4, 49), (8, 49)])
@pytest.mark.parametrize("min_walk", [1, 2])
def test_crw_identical_nodes_give_ln_n(frames, nodes, min_walk):
    q = F.normalize(torch.ones(2, frames, nodes, 16, dtype=torch.float64), dim=-1)
    loss, logs = crw_loss(q, temperature=0.05, min_walk_length=min_walk)
    assert loss.item() == pytest.approx(math.log(nodes), abs=1e-6)
    assert sorted(logs) == sorted([f"xent_k{k}" for k in range(min_walk, frames)]
                                  + [f"acc_k{k}" for k in range(min_walk, frames)])


def walk_return_probability(q, b, n, length, tau):
    """Sum over every palindrome path n -> ... -> n of the product of its transition probabilities."""
    frames, nodes = q.shape[1], q.shape[2]

    def step(t_from, i, t_to, j):
        sims = [float(q[b, t_from, i] @ q[b, t_to, m]) / tau for m in range(nodes)]
        return math.exp(sims[j]) / sum(math.exp(s) for s in sims)

    times = list(range(length + 1)) + list(range(length - 1, -1, -1))  # 0..k..0
    total = 0.0
    for middle in itertools.product(range(nodes), repeat=len(times) - 2):
        path = (n, *middle, n)
        p = 1.0
        for (t0, i), (t1, j) in zip(zip(times, path), zip(times[1:], path[1:])):
            p *= step(t0, i, t1, j)
        total += p
    return total


@pytest.mark.parametrize("min_walk", [1, 2])
def test_crw_matches_path_enumeration(min_walk):
    q = unit(2, 4, 3, 5)
    tau = 0.3
    loss, logs = crw_loss(q, tau, min_walk_length=min_walk)
    per_length = {}
    for k in range(min_walk, 4):
        probs = [walk_return_probability(q, b, n, k, tau) for b in range(2) for n in range(3)]
        per_length[k] = -sum(math.log(p) for p in probs) / len(probs)
        assert logs[f"xent_k{k}"].item() == pytest.approx(per_length[k], rel=1e-10)
    assert loss.item() == pytest.approx(sum(per_length.values()) / len(per_length), rel=1e-10)


def masked_walk_loss(q, tau, drop_fwd, drop_bwd, min_walk):
    """Direct loop form of the loss with explicit edge masks (B, T-1, N, N), both in (from, to) layout."""
    aff = torch.einsum("btnc,btmc->btnm", q[:, :-1], q[:, 1:])
    fwd = F.softmax(aff.masked_fill(drop_fwd, -1e20) / tau, -1)
    bwd = F.softmax(aff.transpose(-1, -2).masked_fill(drop_bwd, -1e20) / tau, -1)
    losses = []
    for k in range(min_walk, q.shape[1]):
        chain = [fwd[:, t] for t in range(k)] + [bwd[:, t] for t in reversed(range(k))]
        walk = chain[0]
        for m in chain[1:]:
            walk = walk @ m
        losses.append(-torch.log(walk.diagonal(dim1=-2, dim2=-1) + 1e-20).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shared", [False, True])
def test_crw_edge_dropout_draw_order_and_sharing(shared):
    """Noise is drawn as videowalk draws it: per forward step, then per backward step (row-major,
    transposed); the shared mode also drops, backwards, every edge dropped forwards (F1, F2)."""
    b, t, n, p = 2, 4, 6, 0.3
    q = unit(b, t, n, 8)
    g = torch.Generator().manual_seed(7)
    fwd_noise = [torch.rand(b, n, n, generator=g, dtype=torch.float32) for _ in range(t - 1)]
    bwd_noise = [torch.rand(b, n, n, generator=g, dtype=torch.float32).transpose(-1, -2) for _ in range(t - 1)]
    drop_fwd = torch.stack(fwd_noise, 1) < p
    drop_bwd = torch.stack(bwd_noise, 1) < p
    if shared:
        drop_bwd = drop_bwd | drop_fwd.transpose(-1, -2)
    expected = masked_walk_loss(q.float(), 0.1, drop_fwd, drop_bwd, 1)
    loss, _ = crw_loss(q.float(), 0.1, p, dropout_shared=shared, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loss, expected)
    no_drop, _ = crw_loss(q.float(), 0.1)
    assert loss.item() != pytest.approx(no_drop.item())


def test_crw_shared_dropout_doubles_backward_drop_rate():
    q = unit(4, 3, 49, 8).float()
    p = 0.1
    g = torch.Generator().manual_seed(0)
    # Re-derive the masks the loss draws, to count them.
    fwd = torch.rand(2, 4, 49, 49, generator=g) < p
    bwd = (torch.rand(2, 4, 49, 49, generator=g) < p) | fwd
    assert bwd.float().mean().item() == pytest.approx(1 - (1 - p) ** 2, abs=0.01)
    shared, _ = crw_loss(q, 0.05, p, dropout_shared=True, generator=torch.Generator().manual_seed(0))
    independent, _ = crw_loss(q, 0.05, p, dropout_shared=False, generator=torch.Generator().manual_seed(0))
    assert shared.item() != independent.item()


def test_crw_loss_decreases_when_optimising_nodes():
    nodes = torch.randn(2, 4, 9, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    opt = torch.optim.Adam([nodes], lr=0.05)
    losses = []
    for _ in range(30):
        loss, _ = crw_loss(F.normalize(nodes, dim=-1), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_crw_rejects_walks_longer_than_the_clip():
    with pytest.raises(ValueError, match="min_walk_length"):
        crw_loss(unit(1, 3, 4, 8), 0.1, min_walk_length=3)


# ---------------------------------------------------------------- DINO


def test_dino_uniform_teacher_and_student_give_ln_d():
    d = 4096
    student = torch.zeros(10, 3, d, dtype=torch.float64)
    targets = teacher_targets(torch.zeros(2, 3, d, dtype=torch.float64), torch.zeros(1, d), 0.04)
    assert dino_loss(student, targets, 0.1).item() == pytest.approx(math.log(d), rel=1e-6)


def test_dino_zero_student_gives_ln_d_for_any_teacher():
    d = 128
    targets = teacher_targets(torch.randn(2, 4, d), torch.randn(1, d), 0.04)
    assert dino_loss(torch.zeros(10, 4, d), targets, 0.1).item() == pytest.approx(math.log(d), rel=1e-6)


def test_dino_matches_hand_computation():
    """D = 3, one image, 2 global + 1 local view: pairs (0,1), (0,2), (1,0), (1,2)."""
    s = torch.tensor([[[1.0, 0.0, -1.0]], [[0.5, 0.5, 0.0]], [[0.0, 2.0, 0.0]]], dtype=torch.float64)
    t = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]], dtype=torch.float64)
    c = torch.tensor([[0.5, -0.5, 0.0]], dtype=torch.float64)
    tau_s, tau_t = 0.5, 0.25

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    q = [softmax([(a - b) / tau_t for a, b in zip(t[g, 0].tolist(), c[0].tolist())]) for g in range(2)]
    logp = [[math.log(p) for p in softmax([x / tau_s for x in s[v, 0].tolist()])] for v in range(3)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-sum(qi * li for qi, li in zip(q[g], logp[v])) for g, v in pairs) / len(pairs)
    got = dino_loss(s, teacher_targets(t, c, tau_t).double(), tau_s)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dino_view_is_not_matched_with_itself():
    """Changing student view 0 only changes the pairs (1, 0), not (0, 0)."""
    targets = teacher_targets(torch.randn(2, 2, 16), torch.zeros(1, 16), 0.04)
    student = torch.randn(4, 2, 16)
    base = dino_loss(student, targets, 0.1)
    targets_one = targets.clone()
    targets_one[1] = F.one_hot(torch.tensor([3, 5]), 16).float()  # teacher view 1 -> only pair (1, v) moves
    moved = student.clone()
    moved[0] += torch.randn(2, 16)
    assert dino_loss(moved, targets, 0.1).item() != pytest.approx(base.item())
    # with a one-hot teacher view 1, the loss's dependence on student view 0 is only through (1, 0)
    a = dino_loss(student, targets_one, 0.1) - dino_loss(moved, targets_one, 0.1)
    pair_10 = lambda s: -(targets_one[1] * F.log_softmax(s[0] / 0.1, -1)).sum(-1).mean()  # noqa: E731
    assert a.item() == pytest.approx(((pair_10(student) - pair_10(moved)) / 6).item(), rel=1e-5)


def test_teacher_temperature_schedule():
    assert [teacher_temperature(e, 0.04, 0.07, 4) for e in range(6)] == pytest.approx(
        [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8))
    assert entropy(F.one_hot(torch.tensor([1, 2]), 8).float()).item() == pytest.approx(0.0, abs=1e-6)


def test_dino_loss_stays_float32_under_bf16_autocast():
    # autocast ran the einsum's bmm in bf16: a bf16 loss (128.86 logged as 129.0) and 0.2 % off gradients
    torch.manual_seed(0)
    student = (3 * torch.randn(6, 4, 4096)).requires_grad_(True)
    targets = teacher_targets(3 * torch.randn(2, 4, 4096), torch.zeros(1, 4096), 0.04)
    reference = dino_loss(student, targets, 0.1)
    (expected,) = torch.autograd.grad(reference, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss(student, targets, 0.1)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, expected)
