"""Two-stage slot attention as SMTC uses it (objectives.md §3.b): semantic slots, then instance slots.

Stage 1 (semantic): S learned slots compete for the N input tokens (softmax over *slots*); each
slot becomes the weighted mean of the values it wins. Stage 2 (instance): every semantic slot
spawns P instance slots sampled around its mean; they compete within their semantic slot
(softmax over *instances*), gated to the positions whose stage-1 logit exceeds ``instance_gate``.
Both stages update residually (no GRU) and backpropagate through the last iteration only, with
gradients flowing straight into the initialisation (SMTC's truncation trick).
"""
from __future__ import annotations

import torch
from torch import nn

from models.heads import MLP


class SlotAttention(nn.Module):
    """SMTC's semantic + instance slot attention over (B, N, dim) tokens.

    Args:
        num_slots: S semantic slots.  num_instances: P instance slots per semantic slot.
        dim: token and slot width.  iters: iterations per stage (SMTC: 3 to train, 5 to evaluate).
        hidden_dim: MLP width (at least ``dim``).  instance_gate: stage-1 logit threshold that
        admits a position into a slot's instance competition.
        reparameterize: False reproduces SMTC's code, where the instance initialisation is a
        ``torch.normal`` draw with no gradient (so ``slots_sigma`` never trains); True samples
        mu + exp(sigma) * eps so both receive gradients.
    """

    def __init__(self, num_slots: int = 16, dim: int = 384, num_instances: int = 4, iters: int = 3,
                 hidden_dim: int = 384, instance_gate: float = 0.3, eps: float = 1e-8,
                 reparameterize: bool = False):
        super().__init__()
        self.num_slots, self.num_instances, self.iters = num_slots, num_instances, iters
        self.instance_gate, self.eps, self.reparameterize = instance_gate, eps, reparameterize
        self.scale = dim ** -0.5
        self.norm_input = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_pre_ff = nn.LayerNorm(dim)
        self.slots_mu = nn.Parameter(torch.randn(1, num_slots, 1, dim))
        self.slots_sigma = nn.Parameter(torch.empty(1, num_slots, 1, dim))
        nn.init.xavier_uniform_(self.slots_sigma)
        self.project_q = nn.Linear(dim, dim)
        self.project_k = nn.Linear(dim, dim)
        self.project_v = nn.Linear(dim, dim)
        self.mlp = MLP(dim, dim, max(dim, hidden_dim), num_layers=2, act="relu")

    def _iterate(self, init: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 normalise_attention) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``iters`` residual updates from ``init`` (B, S[, P], D); return slots and last logits.

        ``normalise_attention(logits)`` turns (B, S[, P], N) logits into weights summing to 1 over N.
        """
        slots = init
        for step in range(self.iters):
            q = self.project_q(self.norm_slots(slots))
            logits = torch.einsum("b...d,bnd->b...n", q, keys) * self.scale
            updates = torch.einsum("b...n,bnd->b...d", normalise_attention(logits), values)
            slots = slots + updates
            slots = slots + self.mlp(self.norm_pre_ff(slots))
            if step == self.iters - 2:  # truncated backprop: keep the value, route grads to init
                slots = slots.detach() - init.detach() + init
        return slots, logits

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens (B, N, dim) -> ``semantic_slots`` (B, S, dim), ``semantic_logits`` (B, S, N),
        ``instance_slots`` (B, S, P, dim), ``instance_logits`` (B, S, P, N)."""
        inputs = self.norm_input(inputs)
        keys, values = self.project_k(inputs), self.project_v(inputs)
        batch = inputs.shape[0]

        def over_slots(logits: torch.Tensor) -> torch.Tensor:
            weights = logits.softmax(dim=1) + self.eps
            return weights / weights.sum(dim=-1, keepdim=True)

        semantic_init = self.slots_mu.squeeze(2).expand(batch, -1, -1)
        semantic, semantic_logits = self._iterate(semantic_init, keys, values, over_slots)

        gate = (semantic_logits > self.instance_gate).to(inputs.dtype).unsqueeze(2)  # (B, S, 1, N)

        def over_instances(logits: torch.Tensor) -> torch.Tensor:
            weights = (logits.softmax(dim=2) + self.eps) * gate
            return weights / (weights.sum(dim=-1, keepdim=True) + self.eps)

        mu = self.slots_mu.expand(batch, -1, self.num_instances, -1)
        sigma = self.slots_sigma.exp().expand(batch, -1, self.num_instances, -1)
        if self.reparameterize:
            instance_init = mu + sigma * torch.randn_like(mu)
        else:
            instance_init = torch.normal(mu.detach(), sigma.detach())
        instance, instance_logits = self._iterate(instance_init, keys, values, over_instances)
        return {"semantic_slots": semantic, "semantic_logits": semantic_logits,
                "instance_slots": instance, "instance_logits": instance_logits}


def slot_masks(semantic_logits: torch.Tensor, instance_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SMTC's inference masks: semantic (…, S, N) softmax over slots, and instance (…, S, P, N) =
    semantic mask x softmax over the P instances of each slot."""
    semantic = semantic_logits.softmax(dim=-2)
    return semantic, semantic.unsqueeze(-2) * instance_logits.softmax(dim=-2)
