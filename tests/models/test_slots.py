"""SMTC slot attention: shapes, a hand-computed iteration, gating, and where gradients flow."""
import pytest
import torch
from torch import nn

from models.slots import SlotAttention, slot_masks


def small_slots(**kwargs) -> SlotAttention:
    torch.manual_seed(0)
    return SlotAttention(num_slots=4, dim=8, num_instances=3, hidden_dim=8, **kwargs)


def test_shapes_and_deterministic_semantic_stage():
    sa = small_slots()
    x = torch.randn(2, 10, 8)
    out = sa(x)
    assert out["semantic_slots"].shape == (2, 4, 8) and out["semantic_logits"].shape == (2, 4, 10)
    assert out["instance_slots"].shape == (2, 4, 3, 8) and out["instance_logits"].shape == (2, 4, 3, 10)
    again = sa(x)
    torch.testing.assert_close(again["semantic_slots"], out["semantic_slots"])  # init = slots_mu
    assert not torch.allclose(again["instance_slots"], out["instance_slots"])   # init is sampled


def test_one_semantic_iteration_by_hand():
    sa = small_slots(iters=1)
    x = torch.randn(1, 5, 8)
    out = sa(x)
    tokens = sa.norm_input(x)[0]
    k, v = sa.project_k(tokens), sa.project_v(tokens)
    mu = sa.slots_mu[0, :, 0]
    logits = sa.project_q(sa.norm_slots(mu)) @ k.T / 8 ** 0.5            # (S, N)
    weights = torch.softmax(logits, dim=0) + 1e-8                         # slots compete per token
    weights = weights / weights.sum(dim=1, keepdim=True)                  # weighted mean per slot
    slots = mu + weights @ v
    slots = slots + sa.mlp(sa.norm_pre_ff(slots))
    torch.testing.assert_close(out["semantic_logits"][0], logits)
    torch.testing.assert_close(out["semantic_slots"][0], slots)


def test_instances_only_attend_inside_their_semantic_gate():
    sa = small_slots(iters=1)
    sa.instance_gate = float("inf")  # nothing passes the gate: instances get no update from values
    x = torch.randn(2, 6, 8)
    torch.manual_seed(1)
    out = sa(x)
    torch.manual_seed(1)  # the semantic stage draws nothing, so this replays the module's sample
    mu = sa.slots_mu.expand(2, -1, 3, -1)
    init = torch.normal(mu, sa.slots_sigma.exp().expand(2, -1, 3, -1))
    expected = init + sa.mlp(sa.norm_pre_ff(init))
    torch.testing.assert_close(out["instance_slots"], expected.detach())


def test_gradients_follow_the_reference_code():
    sa = small_slots()
    out = sa(torch.randn(2, 6, 8))
    readout = nn.Linear(8, 1)
    readout(out["instance_slots"]).sum().backward(retain_graph=True)
    assert sa.slots_sigma.grad is None                      # the torch.normal draw has no gradient
    assert sa.slots_mu.grad is None or sa.slots_mu.grad.abs().max() == 0
    readout(out["semantic_slots"]).sum().backward()
    assert sa.slots_mu.grad.abs().max() > 0
    reparam = small_slots(reparameterize=True)
    reparam(torch.randn(2, 6, 8))["instance_slots"].sum().backward()
    assert reparam.slots_sigma.grad.abs().max() > 0


def test_slot_masks_are_distributions():
    semantic, instance = slot_masks(torch.randn(2, 4, 10), torch.randn(2, 4, 3, 10))
    torch.testing.assert_close(semantic.sum(dim=1), torch.ones(2, 10))
    torch.testing.assert_close(instance.sum(dim=(1, 2)), torch.ones(2, 10))


def test_reparameterised_draw_is_instances_from_noise():
    sa = small_slots(reparameterize=True, iters=1)
    x = torch.randn(2, 6, 8)
    torch.manual_seed(3)
    out = sa(x)
    torch.manual_seed(3)
    init = sa.instances_from_noise(torch.randn(2, 4, 3, 8))
    torch.testing.assert_close(sa(x, instance_init=init)["instance_slots"], out["instance_slots"])


def test_settings_rebuild_the_same_head():
    import models
    from models.slots import SMTCSlots

    torch.manual_seed(0)
    slots = SlotAttention(num_slots=3, dim=192, num_instances=2, iters=4, hidden_dim=256, instance_gate=0.1,
                          gate="softmax")
    net = SMTCSlots(models.build("vit_tiny_patch16"), (2, 3), slots, correlation_wrap=True)
    settings = net.settings()
    assert settings == {"arch": "vit_tiny_patch16", "dim": 192, "num_slots": 3, "num_instances": 2, "iters": 4,
                        "hidden_dim": 256, "gate": "softmax", "gate_threshold": 0.1, "reparameterize": False,
                        "train_grid": [2, 3], "correlation_wrap": True}
    twin = SMTCSlots.from_settings(net.encoder, settings)
    assert twin.settings() == settings
    assert {k: v.shape for k, v in twin.head().state_dict().items()} == \
        {k: v.shape for k, v in net.head().state_dict().items()}
    assert not any(k.startswith("encoder.") for k in net.head().state_dict())
    with pytest.raises(ValueError, match="vit_small_patch16"):
        SMTCSlots.from_settings(net.encoder, {**settings, "arch": "vit_small_patch16"})
