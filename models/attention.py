"""Multi-head attention kernels behind one switch: ``"auto" | "xformers" | "sdpa" | "math"``.

All kernels take and return tensors in the (B, N, heads, head_dim) layout that falls out of the
fused qkv projection, so the caller never copies q/k/v into another layout: xformers consumes it
as is, SDPA and the math path see a transposed view.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "xformers", "sdpa", "math")
# A preference, not a restriction: every SDPA kernel stays eligible, cuDNN is tried first.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


@functools.cache
def xformers_works() -> bool:
    """True when xformers imports *and* its CUDA kernel runs here.

    The PyPI wheel can import on a machine whose build has no CUDA kernels for the local GPU, so
    import success alone proves nothing: run one tiny attention call and catch any failure.
    """
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception:  # ImportError, NotImplementedError (no kernel), CUDA errors: all mean "no"
        return False
    return True


def check_backend(name: str) -> str:
    """Validate a backend name when a model is built, so a bad choice fails before training starts.

    ``xformers`` is checked here (once, cached) rather than per forward pass, which keeps the
    forward free of Python-side probing under ``torch.compile``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "xformers" and not xformers_works():
        raise RuntimeError("attn='xformers' needs a CUDA GPU and a CUDA build of xformers that runs on it: "
                           "pip install 'densevid[xformers]' (a wheel matching your torch and CUDA), "
                           "or use attn='auto'")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The kernel that runs for backend ``name`` (already checked) on ``device``.

    ``auto`` is SDPA, which keeps memory linear in the token count everywhere (FlashAttention-2 /
    memory-efficient kernels on CUDA, a blocked flash kernel on CPU). On Hopper (sm90) it prefers
    SDPA's cuDNN kernel, which torch ranks last by default but which is 1.7-2.3x faster there for
    training shapes (measured in huggingface/transformers#48163, slower on other architectures);
    shapes cuDNN cannot serve fall back to the default order. xformers is opt-in: SDPA's kernels
    are at least as fast on current GPUs with torch >= 2.3.
    """
    if name == "auto":
        # get_device_properties is constant-folded by torch.compile: no graph break here.
        if device.type == "cuda" and torch.cuda.get_device_properties(device).major == 9:
            return "sdpa_cudnn_first"
        return "sdpa"
    if name == "xformers" and device.type != "cuda":
        raise RuntimeError(f"attn='xformers' needs the model on a CUDA device, it is on {device}; "
                           "use attn='auto' or 'sdpa' elsewhere")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax attention over (B, N, heads, d) inputs; returns (B, N, heads, d).

    ``backend`` must already be resolved (see :func:`resolve_backend`). The softmax scale is
    head_dim ** -0.5 for every kernel.
    """
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend == "sdpa_cudnn_first":
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    elif backend == "math":  # in the input precision, like timm's eager path
        out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    else:
        raise ValueError(f"backend {backend!r} is not resolved; call resolve_backend first")
    return out.transpose(1, 2)


def attention_maps(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exact attention maps softmax(q kᵀ / sqrt(d)) for (B, heads, N, d) inputs -> (B, heads, N, N),
    float32 (float64 for float64 inputs).

    Computed in float32 or wider with autocast off, so maps read under bf16 training or evaluation
    are the exact softmax of the (rounded) queries and keys, and each row sums to 1.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        logits = (q.to(dtype) * q.shape[-1] ** -0.5) @ k.to(dtype).transpose(-2, -1)
        return logits.softmax(dim=-1)
