"""Projection heads: DINO's head (objectives.md §0.2) and a configurable MLP.

Parameter names follow DINO (``mlp.N``, ``last_layer.weight_g``, ``last_layer.weight_v``) so the
heads of official DINO / DoRA / SelfPatch checkpoints load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}


class MLP(nn.Module):
    """Linear layers with norm + activation between them; works on (..., in_dim) inputs.

    ``num_layers`` counts Linear layers: 1 is a single Linear(in_dim, out_dim); otherwise
    in -> hidden (-> hidden ...) -> out, each hidden Linear followed by ``norm`` (None, "bn", "ln")
    and ``act`` ("gelu", "relu"). Examples: CRW's head is MLP(512, 128, 512, d + 1, act="relu");
    SMTC's ``mlp_slot`` is MLP(384, 384, 768, 2, act="relu").
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, num_layers: int = 2,
                 act: str = "gelu", norm: str | None = None, bias: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if act not in ACTIVATIONS or (norm is not None and norm not in NORMS):
            raise ValueError(f"act must be one of {list(ACTIVATIONS)} and norm None or one of {list(NORMS)}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=bias))
            if index < num_layers - 1:
                if norm is not None:
                    layers.append(NORMS[norm](d_out))
                layers.append(ACTIVATIONS[act]())
        self.mlp = nn.Sequential(*layers)
        self.uses_batchnorm = norm == "bn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_batchnorm and x.ndim != 2:  # BatchNorm1d wants (B, C): fold leading dims
            return self.mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return self.mlp(x)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| per output row (DINO's ``last_layer``).

    Written out (rather than ``torch.nn.utils.weight_norm``, which is deprecated, or its
    parametrization, which renames parameters) so the state-dict keys stay ``weight_g`` / ``weight_v``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        linear = nn.Linear(in_dim, out_dim, bias=False)  # default init for v, as in DINO
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO projection head: MLP to a bottleneck, L2-normalise, weight-normalised Linear to out_dim.

    With ``norm_last_layer`` the weight norm g is frozen at 1, so the prototypes stay unit norm.
    The trainer freezes every parameter named ``last_layer`` during the first epoch(s).
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        projector = MLP(in_dim, bottleneck_dim, hidden_dim, nlayers, act="gelu", norm="bn" if use_bn else None)
        # DINO's key names: mlp.0, mlp.2, ... (no wrapper level), and plain mlp.weight for one layer.
        self.mlp = projector.mlp if nlayers > 1 else projector.mlp[0]
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim) logits (leading dims are folded for BatchNorm)."""
        folded = self.mlp(x.reshape(-1, x.shape[-1]))
        return self.last_layer(F.normalize(folded, dim=-1)).reshape(*x.shape[:-1], -1)
