"""Sinkhorn-Knopp, in the three forms the seeds really run (objectives.md §0.3).

They are not interchangeable: each balances a different thing, and the objectives' targets depend on
which.

- :func:`sinkhorn_balanced` (SwAV; TimeT's cluster targets): one assignment of every row of the
  batch, on every rank, to K prototypes with each prototype receiving an equal share of the batch.
- :func:`sinkhorn_per_sample` (DoRA's object discovery): the same equipartition, but separately for
  each sample's N patches over its k objects, with a max-subtraction for stability.
- :func:`sinkhorn_transport_plan` (SMTC's dense transport): an entropic optimal-transport plan
  between two given marginals for a cost matrix; the plan itself is the output.

All run under ``no_grad``: the seeds use them to make targets, never to pass gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_balanced(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignments of N rows to K prototypes, balanced over the whole (global) batch.

    Args:
        scores: (N, K) similarities of this rank's rows to the prototypes (TimeT: cosines in [-1, 1];
            no max-subtraction, so keep ``|scores| / epsilon`` small enough for ``exp``).
        epsilon: entropic temperature (TimeT 0.05).
        iterations: alternating normalisations (TimeT runs 10; its ``--sinkhorn_iterations`` is ignored).

    Returns:
        (N, K), float32 (float64 for float64 scores), each row summing to 1. Under torch.distributed
        the prototype masses are all-reduced, so the balance is over the rows of every rank (as SwAV's
        distributed version).

    Q = exp(scores / epsilon) is scaled to total mass 1, then alternately each prototype's mass is set
    to 1/K and each row's to 1/(N * world); finally each row is normalised to sum 1.
    """
    q = torch.exp(scores / epsilon).T  # (K, N)
    world = dist.get_world_size() if _distributed() else 1
    num_prototypes, rows = q.shape
    q = q / _all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / _all_reduce_sum(q.sum(dim=1, keepdim=True)) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / (rows * world)
    q = (q / q.sum(dim=0, keepdim=True)).T
    return q.to(torch.promote_types(q.dtype, torch.float32))


@torch.no_grad()
def sinkhorn_per_sample(logits: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Per-sample equipartition of N patches over k objects (DoRA's ``SinkhornKnopp``).

    Args:
        logits: (B, N, k) patch-to-object similarities.
        epsilon: entropic temperature (DoRA 0.05).
        iterations: alternating normalisations (DoRA 30).

    Returns:
        (B, N, k): every patch's row sums to 1 and every object receives about N / k patches' mass.
        The per-sample maximum is subtracted before ``exp`` (the logits are unbounded: DoRA's
        prototypes are not normalised).
    """
    scaled = logits / epsilon
    q = torch.exp(scaled - scaled.amax(dim=(1, 2), keepdim=True)).transpose(1, 2)  # (B, k, N)
    objects, patches = q.shape[1:]
    q = q / q.sum(dim=(1, 2), keepdim=True)
    for _ in range(iterations):
        q = q / q.sum(dim=2, keepdim=True) / objects
        q = q / q.sum(dim=1, keepdim=True) / patches
    return (q * patches).transpose(1, 2)


@torch.no_grad()
def sinkhorn_transport_plan(cost: torch.Tensor, source_mass: torch.Tensor, target_mass: torch.Tensor,
                            epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic optimal-transport plan between two marginals (SMTC's ``sinkhorn_cluster``).

    Args:
        cost: (P, n, m) transport costs (SMTC: 1 - cosine between two frames' teacher features).
        source_mass: (P, n) non-negative; renormalised to sum 1 per problem.
        target_mass: (P, m) likewise.
        epsilon: entropic temperature (SMTC 0.05).
        iterations: scaling rounds (SMTC 3): a then b, starting from b = 1.

    Returns:
        (P, n, m) plan ``a[:, :, None] * exp(-cost / epsilon) * b[:, None, :]``. Its column sums equal
        ``target_mass`` exactly (the last update is b's); its row sums approach ``source_mass``.
    """
    kernel = torch.exp(-cost / epsilon)
    mu = source_mass / source_mass.sum(dim=-1, keepdim=True)
    nu = target_mass / target_mass.sum(dim=-1, keepdim=True)
    b = torch.ones_like(nu)
    for _ in range(iterations):
        a = mu / (kernel * b[:, None, :]).sum(-1)
        b = nu / (kernel * a[:, :, None]).sum(1)
    return a[:, :, None] * kernel * b[:, None, :]
