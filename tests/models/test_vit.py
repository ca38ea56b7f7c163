"""ViT: backend equivalence, exact attention maps, positional embeddings, timm compatibility."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models.attention import resolve_backend, xformers_works
from models.vit import VisionTransformer, drop_path, resize_pos_embed


def tiny_vit(**kwargs) -> VisionTransformer:
    """A 3-block ViT small enough for CPU tests; same code path as the registered sizes."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3, **kwargs).eval()


def test_registry_builds_named_sizes():
    with torch.device("meta"):  # shapes only: skip the random init of 22M + 86M parameters
        vit = models.build("vit_small_patch16", drop_path=0.1)
        base8 = models.build("vit_base_patch8")
    assert (vit.embed_dim, vit.patch_size, vit.num_heads, len(vit.blocks)) == (384, 16, 6, 12)
    assert vit.pos_embed.shape == (1, 1 + 14 * 14, 384)
    assert sum(p.numel() for p in vit.parameters()) == 21_665_664  # timm vit_small_patch16_224 minus head
    assert vit.blocks[-1].drop_path == pytest.approx(0.1) and vit.blocks[0].drop_path == 0.0
    assert base8.pos_embed.shape == (1, 1 + 28 * 28, 768)
    with pytest.raises(ValueError, match="vit_tiny_patch16"):
        models.build("vit_huge")


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_backends_agree_on_outputs_and_gradients(backend):
    # float64, so any disagreement beyond rounding is a real difference between the kernels.
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = {}
    for name in ("math", backend):
        vit = tiny_vit(attn=name).double()
        out = vit.forward_features(x)
        loss = out["patches"].square().mean() + out["cls"].sum()
        loss.backward()
        results[name] = (out["patches"].detach(), {n: p.grad for n, p in vit.named_parameters()})
    torch.testing.assert_close(results[backend][0], results["math"][0], atol=1e-10, rtol=1e-9)
    for name, grad in results["math"][1].items():
        torch.testing.assert_close(results[backend][1][name], grad, atol=1e-10, rtol=1e-9, msg=name)


def test_backend_switch_validates_names():
    with pytest.raises(ValueError, match="unknown attention backend"):
        tiny_vit(attn="flash")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"pip install 'densevid\[xformers\]'"):
            tiny_vit(attn="xformers")
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_backend("xformers", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_attention_maps_keys_and_queries_equal_explicit_softmax():
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 64)
    out = vit.forward_features(x, return_attention=True, return_keys=True, return_queries=True)
    # Recompute the last block's attention by hand from the tokens that enter it.
    before_last = vit.get_intermediate_layers(x, [-2], norm=False)[0]
    block = vit.blocks[-1]
    qkv = block.attn.qkv(block.norm1(before_last)).reshape(2, 1 + 8, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    assert out["attention"].shape == (2, 3, 9, 9)
    torch.testing.assert_close(out["attention"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 3, 9))
    torch.testing.assert_close(out["keys"], k)
    torch.testing.assert_close(out["queries"], q)
    # Queries alone keep the fast kernel and still equal the projection.
    torch.testing.assert_close(vit.forward_features(x, return_queries=True)["queries"], q)
    # The exact path and the fast path compute the same features.
    torch.testing.assert_close(out["patches"], vit.forward_features(x)["patches"], atol=1e-5, rtol=1e-4)
    # Under bf16 autocast the maps are still a float32 softmax (rows sum to 1 far below bf16 rounding).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = vit.forward_features(x, return_attention=True, return_keys=True)
    assert low["attention"].dtype == torch.float32 and low["keys"].dtype == torch.bfloat16
    torch.testing.assert_close(low["attention"].sum(-1), torch.ones(2, 3, 9), atol=1e-6, rtol=0)
    torch.testing.assert_close(low["attention"], out["attention"], atol=2e-2, rtol=0)


def test_norm_flag_and_intermediate_layers_agree():
    vit = tiny_vit()
    x = torch.randn(1, 3, 64, 64)
    raw = vit.forward_features(x, norm=False)
    normed = vit.forward_features(x, norm=True)
    torch.testing.assert_close(vit.norm(raw["patches"]), normed["patches"])
    layers = vit.get_intermediate_layers(x, n=2)
    assert len(layers) == 2 and layers[-1].shape == (1, 17, 48)
    torch.testing.assert_close(layers[-1][:, 1:], normed["patches"])
    torch.testing.assert_close(vit(x), normed["cls"])
    assert not torch.allclose(layers[0], layers[1])


def test_pos_embed_identity_at_native_size_and_resized_elsewhere():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_pos_embed(pos, (14, 14)) is pos
    for grid in [(30, 53), (6, 6), (14, 20)]:
        resized = resize_pos_embed(pos, grid)
        assert resized.shape == (1, 1 + grid[0] * grid[1], 8)
        torch.testing.assert_close(resized[:, :1], pos[:, :1])  # the CLS position is never resized
    constant = torch.full((1, 1 + 16, 4), 0.25)
    torch.testing.assert_close(resize_pos_embed(constant, (7, 3)), torch.full((1, 1 + 21, 4), 0.25))
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.zeros(1, 1 + 15, 4), (3, 5))


def test_any_input_size_and_clear_error_otherwise():
    vit = tiny_vit()
    out = vit.forward_features(torch.randn(1, 3, 112, 208))  # 480p-like aspect, non-square grid
    assert out["grid"] == (7, 13) and out["patches"].shape == (1, 91, 48)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        vit(torch.randn(1, 3, 60, 64))


def test_without_class_token():
    vit = tiny_vit(class_token=False)
    out = vit.forward_features(torch.randn(2, 3, 32, 32), return_attention=True)
    assert "cls" not in out and out["patches"].shape == (2, 4, 48) and out["attention"].shape == (2, 3, 4, 4)
    assert vit.pos_embed.shape == (1, 16, 48)


def test_without_final_norm_normed_features_are_the_raw_tokens():
    """SelfPatch's backbone: no LayerNorm weights, and eval's norm=True reads the last block as is."""
    torch.manual_seed(0)
    vit = tiny_vit(class_token=False, final_norm=False)
    assert not any(name.startswith("norm.") for name in vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    raw = vit.get_intermediate_layers(x, n=1, norm=False)[0]
    standardised = torch.nn.functional.layer_norm(raw, raw.shape[-1:], eps=1e-6)
    assert (raw - standardised).abs().max() > 0.1  # the raw block output, not a LayerNorm of it
    torch.testing.assert_close(vit.get_intermediate_layers(x, n=1, norm=True)[0], raw)
    torch.testing.assert_close(vit.forward_features(x)["patches"], raw)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert (per_sample == per_sample[:, :1]).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert drop_path(x, 0.25, training=False) is x
    vit = tiny_vit(drop_path=0.5).train()
    inp = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(vit(inp), vit(inp))


def test_gradient_checkpointing_matches_plain_backward():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    saved = []
    for flag in (False, True):
        vit = tiny_vit(grad_checkpointing=flag).train()
        stored = []  # every tensor autograd keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
            out = vit.forward_features(x)["patches"]
        out.sum().backward()
        grads.append(vit.blocks[0].attn.qkv.weight.grad)
        saved.append(len(stored))
    torch.testing.assert_close(grads[0], grads[1])
    assert saved[1] < saved[0] / 3  # checkpointed blocks keep only their inputs for the backward


def test_state_dict_runs_in_timm_vision_transformer():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    vit = tiny_vit()
    reference = timm_vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3,
                                           num_classes=0).eval()
    reference.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    tokens = reference.forward_features(x)
    out = vit.forward_features(x)
    torch.testing.assert_close(out["cls"], tokens[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["patches"], tokens[:, 1:], atol=1e-5, rtol=1e-4)


class RecordOps(TorchDispatchMode):
    """Records (op name, output shapes) of every aten op call run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [tuple(t.shape) for t in outputs if isinstance(t, torch.Tensor)]))
        return out


def test_fast_path_never_materialises_token_by_token_matrices():
    vit = tiny_vit()
    x = torch.randn(1, 3, 160, 160)  # 100 patches + CLS = 101 tokens
    square = lambda shape: len(shape) >= 2 and shape[-2:] == (101, 101)  # noqa: E731
    for maps, fused_blocks in ((False, 3), (True, 2)):
        with torch.no_grad(), RecordOps() as record:
            vit.forward_features(x, return_attention=maps)
        fused = [name for name, _ in record.ops if "scaled_dot_product" in name]
        assert len(fused) == fused_blocks  # the maps only take the last block off the fused kernel
        assert any(square(shape) for _, shapes in record.ops for shape in shapes) == maps


@pytest.mark.gpu
def test_cuda_backends_agree_in_bf16():
    x = torch.randn(4, 3, 64, 96, device="cuda")
    names = ["math", "sdpa", "auto"] + (["xformers"] if xformers_works() else [])
    outputs = {}
    for name in names:
        vit = tiny_vit(attn=name).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = vit.forward_features(x)["patches"]
        out.float().square().mean().backward()
        outputs[name] = (out.float(), vit.blocks[0].attn.qkv.weight.grad)
    for name in names[1:]:
        torch.testing.assert_close(outputs[name][0], outputs["math"][0], atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(outputs[name][1], outputs["math"][1], atol=3e-3, rtol=5e-2)


@pytest.mark.gpu
def test_480p_inference_memory_stays_below_one_attention_matrix():
    vit = models.build("vit_small_patch8").cuda().eval()
    frame = torch.randn(1, 3, 480, 864, device="cuda")  # 60 x 108 = 6,480 patches
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        vit.forward_features(frame)
    one_attention_matrix = 6 * 6481 ** 2 * 4  # heads x N x N float32: 1.0 GB
    assert torch.cuda.max_memory_allocated() - base < one_attention_matrix / 4


def test_registers_and_layer_scale_keep_the_token_contract():
    # float64 so the kernels agree to rounding; registers sit between CLS and the patches
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    outs = {}
    for name in ("math", "sdpa"):
        vit = tiny_vit(attn=name, layer_scale=0.5, reg_tokens=4, no_embed_class=True).double()
        outs[name] = vit.forward_features(x)
    out = vit.forward_features(x, return_attention=True, return_keys=True)  # exact float32 maps, last block
    assert vit.num_prefix_tokens == 5 and vit.pos_embed.shape == (1, 16, 48)  # no positions for the prefix
    assert out["patches"].shape == (2, 15, 48) and out["registers"].shape == (2, 4, 48)
    assert out["attention"].shape == (2, 3, 20, 20) and out["keys"].shape == (2, 3, 20, 16)
    for key in ("cls", "registers", "patches"):
        torch.testing.assert_close(outs["sdpa"][key], outs["math"][key], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(out[key], outs["math"][key], atol=1e-6, rtol=1e-5)
    last = vit.get_intermediate_layers(x, n=1)[0]
    torch.testing.assert_close(last[:, vit.num_prefix_tokens:], out["patches"])
    torch.testing.assert_close(last[:, 0], out["cls"])
    # LayerScale scales the residual branches: gamma 0 makes every block the identity
    for block in vit.blocks:
        block.ls1.gamma.data.zero_()
        block.ls2.gamma.data.zero_()
    tokens, _ = vit.prepare_tokens(x)
    torch.testing.assert_close(vit.get_intermediate_layers(x, n=1, norm=False)[0], tokens)
    assert [name for name, _ in vit.blocks[0].named_parameters() if "ls" in name] == ["ls1.gamma", "ls2.gamma"]


def test_dinov2_names_build_timms_shapes():
    with torch.device("meta"):
        small, base_reg = models.build("vit_small_patch14_dinov2"), models.build("vit_base_patch14_reg4_dinov2")
    assert small.pos_embed.shape == (1, 1 + 37 * 37, 384) and small.patch_size == 14
    assert small.pos_interpolation == "offset" and base_reg.pos_interpolation == "antialias"
    assert base_reg.pos_embed.shape == (1, 37 * 37, 768) and base_reg.reg_token.shape == (1, 4, 768)
    assert sum(p.numel() for p in small.parameters()) == 22_056_192  # timm vit_small_patch14_dinov2, no head
    antialiased = resize_pos_embed(torch.randn(1, 16, 4), (2, 7), num_prefix_tokens=0, mode="antialias")
    assert antialiased.shape == (1, 14, 4)
    with pytest.raises(ValueError, match="interpolation"):
        resize_pos_embed(torch.randn(1, 16, 4), (2, 7), 0, mode="nearest")
