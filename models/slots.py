"""Two-stage slot attention as SMTC uses it (objectives.md §3.b): semantic slots, then instance slots.

Stage 1 (semantic): S learned slots compete for the N input tokens (softmax over *slots*); each
slot becomes the weighted mean of the values it wins. Stage 2 (instance): every semantic slot
spawns P instance slots sampled around its mean; they compete within their semantic slot
(softmax over *instances*), gated to the positions whose stage-1 logit exceeds ``instance_gate``
(SMTC's HEAD code) or weighted by the stage-1 softmax over slots (its first release).
Both stages update residually (no GRU) and backpropagate through the last iteration only, with
gradients flowing straight into the initialisation (SMTC's truncation trick).

:class:`SMTCSlots` is the whole SMTC network around a ViT: last-block keys, correlation injection
from the neighbouring frame, the two slot stages per frame and ``mlp_slot``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import MLP

GATES = ("hard", "softmax")
# SMTCSlots' modules besides the encoder, in the order they run.
HEAD_MODULES = ("transport_proj", "slot_attention", "mlp_slot")


class SlotAttention(nn.Module):
    """SMTC's semantic + instance slot attention over (B, N, dim) tokens.

    Args:
        num_slots: S semantic slots.  num_instances: P instance slots per semantic slot.
        dim: token and slot width.  iters: iterations per stage (SMTC: 3 to train, 5 to evaluate).
        hidden_dim: MLP width (at least ``dim``).  instance_gate: stage-1 logit threshold that
        admits a position into a slot's instance competition (``gate="hard"``).
        gate: "hard" (SMTC's HEAD code: weights x 1[logit > instance_gate], objectives.md S1) or
        "softmax" (its first release: weights x the stage-1 softmax over slots).
        reparameterize: False reproduces SMTC's code, where the instance initialisation is a
        ``torch.normal`` draw with no gradient (so ``slots_sigma`` never trains); True samples
        mu + exp(sigma) * eps so both receive gradients.
    """

    def __init__(self, num_slots: int = 16, dim: int = 384, num_instances: int = 4, iters: int = 3,
                 hidden_dim: int = 384, instance_gate: float = 0.3, eps: float = 1e-8,
                 reparameterize: bool = False, gate: str = "hard"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"SlotAttention gate={gate!r}: choose one of {GATES}")
        self.gate = gate
        self.num_slots, self.num_instances, self.iters, self.hidden_dim = num_slots, num_instances, iters, hidden_dim
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

    def instances_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Stage-2 initialisation from standard-normal ``noise`` (..., S, P, dim): slots_mu + exp(slots_sigma)
        * noise, the distribution the module samples from. A fixed ``noise`` gives every frame the same
        instance draw (discovery keeps instance ids consistent over a video that way)."""
        return self.slots_mu + self.slots_sigma.exp() * noise

    def forward(self, inputs: torch.Tensor, instance_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tokens (B, N, dim) -> ``semantic_slots`` (B, S, dim), ``semantic_logits`` (B, S, N),
        ``instance_slots`` (B, S, P, dim), ``instance_logits`` (B, S, P, N).

        ``instance_init`` (B, S, P, dim) replaces the stage-2 draw (tests feed both implementations
        the same sample)."""
        inputs = self.norm_input(inputs)
        keys, values = self.project_k(inputs), self.project_v(inputs)
        batch = inputs.shape[0]

        def over_slots(logits: torch.Tensor) -> torch.Tensor:
            weights = logits.softmax(dim=1) + self.eps
            return weights / weights.sum(dim=-1, keepdim=True)

        semantic_init = self.slots_mu.squeeze(2).expand(batch, -1, -1)
        semantic, semantic_logits = self._iterate(semantic_init, keys, values, over_slots)

        if self.gate == "hard":
            gate = (semantic_logits > self.instance_gate).to(inputs.dtype).unsqueeze(2)  # (B, S, 1, N)
        else:
            gate = semantic_logits.softmax(dim=1).unsqueeze(2)

        def over_instances(logits: torch.Tensor) -> torch.Tensor:
            weights = (logits.softmax(dim=2) + self.eps) * gate
            return weights / (weights.sum(dim=-1, keepdim=True) + self.eps)

        if instance_init is None:
            mu = self.slots_mu.expand(batch, -1, self.num_instances, -1)
            if self.reparameterize:
                instance_init = self.instances_from_noise(torch.randn_like(mu))
            else:
                sigma = self.slots_sigma.exp().expand(batch, -1, self.num_instances, -1)
                instance_init = torch.normal(mu.detach(), sigma.detach())
        instance, instance_logits = self._iterate(instance_init, keys, values, over_instances)
        return {"semantic_slots": semantic, "semantic_logits": semantic_logits,
                "instance_slots": instance, "instance_logits": instance_logits}


def slot_masks(semantic_logits: torch.Tensor, instance_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SMTC's inference masks: semantic (…, S, N) softmax over slots, and instance (…, S, P, N) =
    semantic mask x softmax over the P instances of each slot."""
    semantic = semantic_logits.softmax(dim=-2)
    return semantic, semantic.unsqueeze(-2) * instance_logits.softmax(dim=-2)


def semantic_instance_cosine(semantic_slots: torch.Tensor, instance_slots: torch.Tensor) -> torch.Tensor:
    """Cosine of every instance slot (…, S, P, D) with its semantic slot (…, S, D) -> (…, S, P): SMTC's
    test of whether an instance is a real part of its slot (training: > 0.5; discovery: >= 0.5)."""
    return torch.einsum("...sc,...spc->...sp", F.normalize(semantic_slots, dim=-1), F.normalize(instance_slots, dim=-1))


class SMTCSlots(nn.Module):
    """SMTC's network (objectives.md §3.b) over clips (B, T, 3, H, W): ViT last-block keys, correlation
    injection from the neighbouring frame, semantic + instance slots per frame, and ``mlp_slot``.

    Args:
        encoder: a ``models.vit.VisionTransformer``; its last block's keys (heads concatenated,
            no final norm) are the tokens.
        train_grid: token grid (h, w) at the training resolution; ``transport_proj`` reads h*w
            correlation channels, so keys at other resolutions are bilinearly resized to it first.
        correlation_wrap: True reproduces SMTC's ``torch.roll`` (frame 0 is correlated with the last
            frame, S4); False pairs frame 0 with frame 1 and every other frame with the one before.
        slots: the :class:`SlotAttention` over the injected keys (its ``dim`` is the encoder's).
    """

    def __init__(self, encoder: nn.Module, train_grid: tuple[int, int], slots: SlotAttention,
                 correlation_wrap: bool = False):
        super().__init__()
        dim = encoder.embed_dim
        self.encoder, self.train_grid, self.correlation_wrap = encoder, tuple(train_grid), correlation_wrap
        self.transport_proj = nn.Conv1d(self.train_grid[0] * self.train_grid[1], dim, kernel_size=1)
        self.slot_attention = slots
        self.mlp_slot = MLP(dim, dim, 2 * dim, num_layers=2, act="relu")

    def head(self) -> nn.ModuleDict:
        """The network around the encoder (``transport_proj``, ``slot_attention``, ``mlp_slot``), sharing
        this module's parameters: what a run exports as its slot head, the encoder being its backbone."""
        return nn.ModuleDict({name: getattr(self, name) for name in HEAD_MODULES})

    def settings(self) -> dict:
        """Everything besides the weights that rebuilds :meth:`head` (JSON types; see :meth:`from_settings`)."""
        slots = self.slot_attention
        return {"arch": getattr(self.encoder, "build_spec", (None,))[0], "dim": self.encoder.embed_dim,
                "num_slots": slots.num_slots, "num_instances": slots.num_instances, "iters": slots.iters,
                "hidden_dim": slots.hidden_dim, "gate": slots.gate, "gate_threshold": slots.instance_gate,
                "reparameterize": slots.reparameterize, "train_grid": list(self.train_grid),
                "correlation_wrap": self.correlation_wrap}

    @classmethod
    def from_settings(cls, encoder: nn.Module, settings: dict) -> "SMTCSlots":
        """A freshly initialised network around ``encoder`` with the head that ``settings`` (from
        :meth:`settings`, possibly edited, e.g. more ``iters`` to evaluate) describe."""
        arch = getattr(encoder, "build_spec", (None,))[0]
        if settings.get("arch") and arch and settings["arch"] != arch:
            raise ValueError(f"the slot head was trained on a {settings['arch']} encoder, not {arch}")
        if settings["dim"] != encoder.embed_dim:
            raise ValueError(f"the slot head is {settings['dim']} wide, the encoder {encoder.embed_dim}")
        slots = SlotAttention(settings["num_slots"], settings["dim"], settings["num_instances"], settings["iters"],
                              settings["hidden_dim"], instance_gate=settings["gate_threshold"],
                              reparameterize=settings["reparameterize"], gate=settings["gate"])
        return cls(encoder, tuple(settings["train_grid"]), slots, correlation_wrap=settings["correlation_wrap"])

    def neighbours(self, frames: int) -> torch.Tensor:
        """Index of the frame each frame is correlated with."""
        index = torch.arange(frames) - 1
        index[0] = (frames - 1) if self.correlation_wrap else min(1, frames - 1)
        return index

    def keys(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, 3, H, W) -> last-block keys (N, h*w, D), heads concatenated, CLS dropped; and (h, w)."""
        out = self.encoder.forward_features(images, norm=False, return_keys=True)
        keys = out["keys"][:, :, self.encoder.num_prefix_tokens:]          # (N, heads, h*w, d)
        return keys.transpose(1, 2).flatten(2), out["grid"]

    def inject_correlation(self, keys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, T, N, D) keys -> keys + transport_proj(correlation with the neighbouring frame's keys)."""
        batch, frames, tokens, dim = keys.shape
        other = keys[:, self.neighbours(frames).to(keys.device)].flatten(0, 1)   # (B*T, N, D)
        if grid != self.train_grid:
            other = other.transpose(1, 2).reshape(-1, dim, *grid)
            other = F.interpolate(other, size=self.train_grid, mode="bilinear").flatten(2).transpose(1, 2)
        correlation = torch.einsum("bnc,bmc->bnm", other, keys.flatten(0, 1))    # raw keys, no norm
        injected = self.transport_proj(correlation).transpose(1, 2)              # (B*T, N, D)
        return keys + injected.view(batch, frames, tokens, dim)

    def forward(self, clip: torch.Tensor, instance_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Clip (B, T, 3, H, W) -> ``keys`` (B, T, N, D) before injection (the OT's features),
        ``semantic_logits`` (B, T, S, N), ``semantic_slots`` (B, T, S, D), ``instance_slots``
        (B, T, S, P, D), ``instance_logits`` (B, T, S, P, N) and ``objects`` (B, T, S, P, D) =
        L2-normalised ``mlp_slot(instance_slots)``. ``instance_init``: (B*T, S, P, D) stage-2 sample."""
        batch, frames = clip.shape[:2]
        keys, grid = self.keys(clip.flatten(0, 1))
        keys = keys.unflatten(0, (batch, frames))
        slots = self.slot_attention(self.inject_correlation(keys, grid).flatten(0, 1), instance_init)
        out = {name: value.unflatten(0, (batch, frames)) for name, value in slots.items()}
        out["keys"] = keys
        out["objects"] = F.normalize(self.mlp_slot(out["instance_slots"]), dim=-1)
        return out
