"""SMTC: each loss on hand-checked inputs, the OT plan in use, Hungarian matching, where gradients
stop, a loss that decreases, and equality with a loop-style transcription of the reference code."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from models.slots import SlotAttention, SMTCSlots
from train.objectives.smtc import (SMTC, SMTCConfig, dense_transport_loss, frame_pairs, instance_contrast_loss,
                                   match_instances, slot_diversity_loss, transport_plans, valid_instances)
from train.sinkhorn import sinkhorn_transport_plan


# ---------------------------------------------------------------- reference, transcribed from the spec
# objectives.md §3.a/§3.b, written as the reference runs it: python loops over pairs, batch and slots,
# scipy's Hungarian solver per (b, s), the OT scaling loop inline.

def ref_diversity(m):
    u = F.normalize(m.softmax(dim=-2) + 1e-8, dim=-1)
    b, t, s, _ = m.shape
    total, count = 0.0, 0
    for bi in range(b):
        for ti in range(t):
            for x in range(s):
                for y in range(s):
                    if x != y:
                        total = total + (u[bi, ti, x] * u[bi, ti, y]).sum()
                        count += 1
    return total / count


def ref_sinkhorn(mu_s, mu_t, cost, eps=0.05, iters=3):
    kernel = torch.exp(-cost / eps)
    mu_s, mu_t = mu_s / mu_s.sum(), mu_t / mu_t.sum()
    b = torch.ones_like(mu_t)
    for _ in range(iters):
        a = mu_s / (kernel * b[None, :]).sum(1)
        b = mu_t / (kernel * a[:, None]).sum(0)
    return a[:, None] * kernel * b[None, :]


def ref_dense_transport(m_s, m_t, feats):
    b, t, s, n = m_s.shape
    unit = F.normalize(feats, dim=-1)
    losses = []
    for i in range(t):
        for j in range(t):
            if i == j:
                continue
            for bi in range(b):
                with torch.no_grad():
                    cost = 1 - unit[bi, i] @ unit[bi, j].T
                    plan = ref_sinkhorn(unit[bi, i].abs().sum(-1), unit[bi, j].abs().sum(-1), cost)
                p_s = m_s[bi, i].softmax(0)
                p_t = m_t[bi, j].softmax(0)
                cross = torch.zeros(n, n, dtype=m_s.dtype)
                for x in range(s):
                    cross = cross + p_t[x][None, :] * torch.log(p_s[x][:, None] + 1e-8)
                losses.append((-cross * plan).sum())
    return sum(losses) / len(losses)


def ref_valid(m, sem, ins):
    b, t, s, p, _ = ins.shape
    out = torch.zeros(b, t, s, p, dtype=m.dtype)
    mask = m.softmax(dim=2)
    for bi, ti, si in itertools.product(range(b), range(t), range(s)):
        area = (mask[bi, ti, si] > 0.3).double().mean()
        for pi in range(p):
            cos = F.cosine_similarity(sem[bi, ti, si], ins[bi, ti, si, pi], dim=0)
            out[bi, ti, si, pi] = float(cos > 0.5 and area > 0.2)
    return out


def ref_object_loss(v_s, v_t, o_s, o_t):
    b, t, s, p, _ = o_s.shape
    total, denom = 0.0, 0.0
    for i in range(t):
        for j in range(t):
            for bi in range(b):
                for si in range(s):
                    sim = o_s[bi, i, si] @ o_t[bi, j, si].T                      # (P, Q)
                    rows, cols = linear_sum_assignment((1 - sim).detach().numpy())
                    for pi, qi in zip(rows, cols):
                        negs = [F.relu(sim[pi, q] - 0.5) for q in range(p) if q != qi]
                        term = sum(negs) / len(negs) - v_t[bi, j, si, qi] * sim[pi, qi]
                        total = total + v_s[bi, i, si, pi] * term
                    denom = denom + (v_s[bi, i, si] + 1e-10).sum()
    return total / denom


def ref_slot_attention(sa, inputs, instance_init):
    """SlotAttention of §3.b with SMTC's parameter names, one batch element at a time."""
    outs = []
    for x in inputs:
        x = sa.norm_input(x)
        k, v = sa.project_k(x), sa.project_v(x)
        init = sa.slots_mu[0, :, 0]
        slots = init
        for it in range(sa.iters):
            prev = slots
            dots = sa.project_q(sa.norm_slots(slots)) @ k.T * sa.scale           # (S, N)
            attn = dots.softmax(dim=0) + 1e-8
            attn = attn / attn.sum(dim=-1, keepdim=True)
            slots = prev + attn @ v
            slots = slots + sa.mlp(sa.norm_pre_ff(slots))
            if it == sa.iters - 2:
                slots = slots.detach() - init.detach() + init
        semantic, semantic_attn = slots, dots
        instances, instance_logits = [], []
        for si in range(sa.num_slots):
            init_i = instance_init[len(outs), si]
            slots = init_i
            gate = (semantic_attn[si] > 0.3).double()
            for it in range(sa.iters):
                prev = slots
                dots = sa.project_q(sa.norm_slots(slots)) @ k.T * sa.scale       # (P, N)
                attn = (dots.softmax(dim=0) + 1e-8) * gate[None]
                attn = attn / (attn.sum(dim=-1, keepdim=True) + 1e-8)
                slots = prev + attn @ v
                slots = slots + sa.mlp(sa.norm_pre_ff(slots))
                if it == sa.iters - 2:
                    slots = slots.detach() - init_i.detach() + init_i
            instances.append(slots)
            instance_logits.append(dots)
        outs.append((semantic, semantic_attn, torch.stack(instances), torch.stack(instance_logits)))
    return [torch.stack(parts) for parts in zip(*outs)]


def ref_correlation(keys, proj, wrap=True):
    """calculate_transport on torch.roll(keys, 1, time): keys (b, t, c, n)."""
    b, t, c, n = keys.shape
    rolled = torch.roll(keys, shifts=1, dims=1)
    out = torch.zeros_like(keys)
    for bi in range(b):
        for ti in range(t):
            corr = rolled[bi, ti].T @ keys[bi, ti]                                # (n', m)
            out[bi, ti] = proj(corr[None])[0]
    return keys + out


# ---------------------------------------------------------------- inputs of §7.3

@pytest.fixture
def loss_inputs():
    torch.manual_seed(0)
    b, t, s, p, n, c = 2, 4, 16, 4, 64, 32
    d = torch.float64
    m_s, m_t = 2 * torch.randn(b, t, s, n, dtype=d), 2 * torch.randn(b, t, s, n, dtype=d)
    m_s[:, :, :4] += 6
    m_t[:, :, :4] += 6
    feats = torch.randn(b, t, n, c, dtype=d)
    sem = torch.randn(b, t, s, c, dtype=d)
    ins = sem[..., None, :] + 0.5 * torch.randn(b, t, s, p, c, dtype=d)
    sem_t = torch.randn(b, t, s, c, dtype=d)
    ins_t = sem_t[..., None, :] + 0.5 * torch.randn(b, t, s, p, c, dtype=d)
    o_s = F.normalize(torch.randn(b, t, s, p, c, dtype=d), dim=-1)
    o_t = F.normalize(torch.randn(b, t, s, p, c, dtype=d), dim=-1)
    return dict(m_s=m_s, m_t=m_t, feats=feats, sem=sem, sem_t=sem_t, ins=ins, ins_t=ins_t, o_s=o_s, o_t=o_t)


def rel_close(a, b, rtol=1e-5):
    a, b = float(a), float(b)
    assert abs(a - b) <= rtol * max(abs(float(b)), 1e-12), (a, b)


def test_losses_equal_the_reference_transcription(loss_inputs):
    x = loss_inputs
    m_s = x["m_s"].clone().requires_grad_()
    o_s = x["o_s"].clone().requires_grad_()
    ours = {
        "div": slot_diversity_loss(m_s),
        "cons": dense_transport_loss(m_s, x["m_t"], transport_plans(x["feats"], 0.05, 3)),
    }
    v_s, v_t = valid_instances(m_s, x["sem"], x["ins"]), valid_instances(x["m_t"], x["sem_t"], x["ins_t"])
    ours["inst"] = instance_contrast_loss(v_s, v_t, o_s, x["o_t"])
    m_r, o_r = x["m_s"].clone().requires_grad_(), x["o_s"].clone().requires_grad_()
    rv_s, rv_t = ref_valid(m_r.detach(), x["sem"], x["ins"]), ref_valid(x["m_t"], x["sem_t"], x["ins_t"])
    ref = {"div": ref_diversity(m_r), "cons": ref_dense_transport(m_r, x["m_t"], x["feats"]),
           "inst": ref_object_loss(rv_s, rv_t, o_r, x["o_t"])}
    assert torch.equal(v_s, rv_s) and torch.equal(v_t, rv_t)
    assert 0.05 < float(v_s.mean()) < 0.95  # the filter is exercised both ways
    for key in ours:
        rel_close(ours[key], ref[key])
    sum(ours.values()).backward()
    sum(ref.values()).backward()
    torch.testing.assert_close(m_s.grad, m_r.grad, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(o_s.grad, o_r.grad, rtol=1e-5, atol=1e-12)


def test_slot_attention_and_correlation_equal_the_reference_transcription(float64):
    torch.manual_seed(0)
    sa = SlotAttention(num_slots=16, dim=384, num_instances=4, iters=3, hidden_dim=384)
    inputs = torch.randn(8, 64, 384)
    init = torch.normal(sa.slots_mu.expand(8, -1, 4, -1), sa.slots_sigma.exp().expand(8, -1, 4, -1)).detach()
    ours = sa(inputs.requires_grad_(), instance_init=init)
    ref = ref_slot_attention(sa, inputs, init)
    names = ("semantic_slots", "semantic_logits", "instance_slots", "instance_logits")
    for name, value in zip(names, ref):
        torch.testing.assert_close(ours[name], value, rtol=1e-10, atol=1e-10)
    readout = torch.randn(384)
    (g_ours,) = torch.autograd.grad((ours["semantic_slots"] @ readout).sum(), inputs)
    (g_ref,) = torch.autograd.grad((ref[0] @ readout).sum(), inputs)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)  # truncated at iters - 2

    torch.manual_seed(1)
    keys = torch.randn(2, 4, 384, 16)                                      # (b, t, c, n), grid 4 x 4
    net = SMTCSlots(nn_encoder_stub(), (4, 4), sa, correlation_wrap=True)
    ours = net.inject_correlation(keys.transpose(2, 3), (4, 4))
    ref = ref_correlation(keys, net.transport_proj).transpose(2, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-8)


def nn_encoder_stub():
    enc = torch.nn.Module()
    enc.embed_dim = 384
    return enc


def test_truncated_iterations_stop_gradients_to_all_but_the_last():
    torch.manual_seed(0)
    sa = SlotAttention(num_slots=3, dim=8, num_instances=2, iters=3, hidden_dim=8)
    x = torch.randn(1, 5, 8, requires_grad=True)
    out = sa(x)
    # with iters = 1 from the (detached) slots of iteration 2, the gradient is the same
    tokens = sa.norm_input(x)
    k, v = sa.project_k(tokens), sa.project_v(tokens)
    with torch.no_grad():
        sa_two = SlotAttention(num_slots=3, dim=8, num_instances=2, iters=2, hidden_dim=8)
        sa_two.load_state_dict(sa.state_dict())
        slots = sa_two(x)["semantic_slots"]
    init = sa.slots_mu[:, :, 0]
    slots = slots - init.detach() + init
    logits = torch.einsum("bsd,bnd->bsn", sa.project_q(sa.norm_slots(slots)), k) * sa.scale
    weights = logits.softmax(1) + 1e-8
    last = slots + (weights / weights.sum(-1, keepdim=True)) @ v
    last = last + sa.mlp(sa.norm_pre_ff(last))
    (g_module,) = torch.autograd.grad(out["semantic_slots"].sum(), x)
    (g_last,) = torch.autograd.grad(last.sum(), x)
    torch.testing.assert_close(g_module, g_last)


def test_closed_forms():
    logits = torch.zeros(2, 4, 16, 9, dtype=torch.float64)
    rel_close(slot_diversity_loss(logits), 1.0)
    plans = transport_plans(torch.randn(2, 4, 9, 5, dtype=torch.float64), 0.05, 3)
    rel_close(dense_transport_loss(logits, logits, plans), -math.log(1 / 16 + 1e-8))
    objects = F.normalize(torch.randn(2, 4, 3, 4, 5, dtype=torch.float64), dim=-1)
    none = torch.zeros(2, 4, 3, 4, dtype=torch.float64)
    assert float(instance_contrast_loss(none, none + 1, objects, objects)) == 0.0


def test_diversity_by_hand():
    # two slots over three positions: masks (softmax over slots) [1, 0, .5] and [0, 1, .5]
    logits = torch.tensor([[[[50.0, -50.0, 0.0], [-50.0, 50.0, 0.0]]]], dtype=torch.float64)
    u = torch.tensor([[1, 0, 0.5], [0, 1, 0.5]], dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    rel_close(slot_diversity_loss(logits), float(u[0] @ u[1]))               # 0.25 / 1.25 = 0.2
    rel_close(slot_diversity_loss(logits), 0.2, rtol=1e-6)


def test_consistency_by_hand():
    # T = 2, N = 2, S = 2. Teacher keys orthogonal per position and equal across frames: the plan is
    # (almost exactly) the identity / 2, so the loss is the mean cross-entropy at matching positions.
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).expand(1, 2, 2, 2)
    plans = transport_plans(keys, 0.05, 3)
    torch.testing.assert_close(plans, torch.eye(2, dtype=torch.float64).expand(1, 2, 2, 2) / 2, atol=1e-8, rtol=0)
    student = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[0.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    ps, pt = student.softmax(2), teacher.softmax(2)
    expected = 0.0
    for i, j in ((0, 1), (1, 0)):
        for n in range(2):  # plan mass 1/2 at (n, n)
            expected += -0.5 * sum(pt[0, j, s, n] * math.log(ps[0, i, s, n] + 1e-8) for s in range(2))
    rel_close(dense_transport_loss(student, teacher, plans), expected / 2, rtol=1e-6)


def test_instance_contrast_by_hand():
    # T = 1, one slot, P = 2 instances in 2-D: the teacher's are the student's swapped.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    student = torch.stack([e1, e2]).view(1, 1, 1, 2, 2)
    teacher = torch.stack([e2, e1]).view(1, 1, 1, 2, 2)
    ones = torch.ones(1, 1, 1, 2)
    assert float(instance_contrast_loss(ones, ones, student, teacher)) == pytest.approx(-1.0)
    # an invalid teacher match removes the pull; a close negative (cos 0.8) is pushed by 0.8 - 0.5
    teacher_valid = torch.tensor([[[[1.0, 0.0]]]])
    close = torch.stack([e2, F.normalize(torch.tensor([0.8, 0.6]), dim=0)]).view(1, 1, 1, 2, 2)
    # student e1 matches close[1] (0.8 + 1 beats 0 + 0): positive 0.8 (teacher 1 invalid), negative cos(e1, e2) = 0
    # student e2 matches close[0]: positive 1 (valid), negative cos(e2, close[1]) = 0.6 -> 0.1
    expected = ((0.0 - 0.0 * 0.8) + (0.1 - 1.0 * 1.0)) / 2
    assert float(instance_contrast_loss(ones, teacher_valid, student, close)) == pytest.approx(expected)


def test_hungarian_matching_equals_brute_force_and_scipy():
    torch.manual_seed(0)
    sim = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    match = match_instances(sim)
    for index in itertools.product(range(3), range(5)):
        best = max(itertools.permutations(range(4)), key=lambda perm: sum(sim[index][p, q] for p, q in enumerate(perm)))
        assert match[index].tolist() == list(best)
        assert match[index].tolist() == linear_sum_assignment((1 - sim[index]).numpy())[1].tolist()
    big = torch.randn(2, 7, 7, dtype=torch.float64)                           # the scipy path (P > 6)
    for row, m in zip(big, match_instances(big)):
        best = max(itertools.permutations(range(7)), key=lambda perm: sum(row[p, q] for p, q in enumerate(perm)))
        assert m.tolist() == list(best)


def test_transport_plans_marginals_in_use():
    torch.manual_seed(0)
    keys = torch.randn(2, 4, 9, 6, dtype=torch.float64)
    plans = transport_plans(keys, 0.05, 3)
    assert plans.shape == (2, 12, 9, 9) and not plans.requires_grad
    i, j = frame_pairs(4, same=False)
    mass = F.normalize(keys, dim=-1).abs().sum(-1)
    target = mass[:, j] / mass[:, j].sum(-1, keepdim=True)
    source = mass[:, i] / mass[:, i].sum(-1, keepdim=True)
    torch.testing.assert_close(plans.sum(-2), target)                         # exact after the last b-update
    # rows approach theirs: 3 rounds already halve the distance of the unbalanced kernel's rows
    kernel = torch.exp(-(1 - F.normalize(keys, dim=-1)[:, i] @ F.normalize(keys, dim=-1)[:, j].transpose(-1, -2)) / 0.05)
    start = (kernel / kernel.sum((-1, -2), keepdim=True)).sum(-1)
    assert (plans.sum(-1) - source).abs().sum() < 0.5 * (start - source).abs().sum()
    # pair 5 is (i, j) = (1, 3): its plan is that frame pair's problem solved alone
    assert (int(i[5]), int(j[5])) == (1, 3)
    unit = F.normalize(keys, dim=-1)
    alone = sinkhorn_transport_plan(1 - unit[:, 1] @ unit[:, 3].transpose(1, 2), mass[:, 1], mass[:, 3], 0.05, 3)
    torch.testing.assert_close(plans[:, 5], alone)
    torch.testing.assert_close(plans.sum((-1, -2)), torch.ones(2, 12, dtype=torch.float64))


def test_invalid_instances_get_no_gradient(loss_inputs):
    x = loss_inputs
    o_s = x["o_s"].clone().requires_grad_()
    v_s = valid_instances(x["m_s"], x["sem"], x["ins"])
    assert not v_s.requires_grad
    instance_contrast_loss(v_s, torch.ones_like(v_s), o_s, x["o_t"]).backward()
    grad_norm = o_s.grad.norm(dim=-1)
    assert (grad_norm[v_s == 0] == 0).all() and (grad_norm[v_s == 1] > 0).any()


def tiny_smtc(**overrides):
    cfg = SMTCConfig(num_slots=4, num_instances=2, size=32, **overrides)
    torch.manual_seed(0)
    return SMTC(cfg, arch="vit_tiny_patch16", drop_path=0.0, total_steps=10, steps_per_epoch=1)


def test_teacher_gets_no_gradient_and_keeps_its_encoder():
    smtc = tiny_smtc()
    clip = torch.randn(2, 2, 4, 3, 32, 32)
    loss, logs = smtc({"clip": clip})
    loss.backward()
    assert all(p.grad is None for p in smtc.teacher.parameters())
    assert smtc.student.slot_attention.slots_sigma.grad is None             # S2: torch.normal, no gradient
    assert smtc.student.encoder.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    encoder = {k: v.clone() for k, v in smtc.teacher.net.encoder.state_dict().items()}
    head = smtc.teacher.net.mlp_slot.mlp[0].weight.clone()
    with torch.no_grad():
        for p in smtc.student.parameters():
            p.add_(1.0)
    smtc.after_step(0)
    assert all(torch.equal(v, smtc.teacher.net.encoder.state_dict()[k]) for k, v in encoder.items())
    torch.testing.assert_close(smtc.teacher.net.mlp_slot.mlp[0].weight, head + 0.001)
    moving = tiny_smtc(teacher_encoder_ema=True)
    with torch.no_grad():
        for p in moving.student.encoder.parameters():
            p.add_(1.0)
    before = moving.teacher.net.encoder.pos_embed.clone()
    moving.after_step(0)
    torch.testing.assert_close(moving.teacher.net.encoder.pos_embed, before + 0.001)


def test_correlation_pairs_and_softmax_gate():
    smtc = tiny_smtc()
    assert smtc.student.neighbours(4).tolist() == [1, 0, 1, 2]
    assert tiny_smtc(correlation_wrap=True).student.neighbours(4).tolist() == [3, 0, 1, 2]
    soft = tiny_smtc(instance_gate="softmax")
    out = soft.student(torch.randn(1, 3, 3, 32, 32))
    assert out["instance_slots"].shape == (1, 3, 4, 2, 192) and torch.isfinite(out["instance_slots"]).all()
    # another resolution: keys are resized to the training grid before transport_proj
    assert smtc.student(torch.randn(1, 2, 3, 48, 32))["semantic_logits"].shape == (1, 2, 4, 6)


def test_loss_decreases_on_a_fixed_batch():
    smtc = tiny_smtc()
    torch.manual_seed(1)
    batch = {"clip": torch.randn(2, 2, 4, 3, 32, 32)}
    optimizer = torch.optim.AdamW([p for p in smtc.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(2)  # the same instance draws every step
        loss, _ = smtc(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        smtc.after_step(0)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses


def test_exported_slots_rebuild_the_students_network(tmp_path):
    """What train/run.py exports (backbone + slots.safetensors) rebuilds the student: same outputs on the
    same clip and instance draw, its non-default settings included."""
    import models.io
    from train.checkpoint import export_networks

    smtc = tiny_smtc(instance_gate="softmax", correlation_wrap=True, slot_iters=2, clip_len=3).eval()
    with torch.no_grad():  # away from any fresh initialisation, encoder included
        for p in smtc.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    written = export_networks(smtc, tmp_path)
    assert [p.name for p in written] == ["backbone.safetensors", "slots.safetensors"]
    encoder = models.io.load_backbone(tmp_path / "backbone.safetensors")
    network, settings = models.io.load_smtc_slots(tmp_path / "slots.safetensors", encoder)
    assert (settings["clip_len"], settings["gate"], settings["iters"]) == (3, "softmax", 2)
    assert settings["train_grid"] == [2, 2] and settings["correlation_wrap"]
    torch.manual_seed(1)
    clip = torch.randn(1, 3, 3, 48, 32)  # not the training size: keys are resized to the training grid
    init = smtc.student.slot_attention.instances_from_noise(torch.randn(4, 2, 192)).expand(3, -1, -1, -1)
    with torch.no_grad():
        expected, got = smtc.student(clip, init), network(clip, init)
        five = models.io.load_smtc_slots(tmp_path / "slots.safetensors", encoder, iters=5)[0](clip, init)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert not torch.allclose(five["semantic_slots"], expected["semantic_slots"])  # the override is used
