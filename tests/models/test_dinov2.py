"""DINOv2 backbones: official checkpoints load to timm's tensors and give timm's features."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.io import export_backbone, load_backbone, load_into, read_checkpoint
from tests.models.dinov2_checkpoints import OFFICIAL_NAMES, TIMM_NAMES, official_dinov2_state

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

NON_SQUARE = (126, 182)  # a 9 x 13 grid: the stored 37 x 37 positions are interpolated


@pytest.fixture(scope="module", params=[0, 4], ids=["no-registers", "reg4"])
def official(request, tmp_path_factory):
    """(official state dict, its file under the official name, timm's model of the same name with the
    same weights converted by timm's own checkpoint filter)."""
    registers = request.param
    state = official_dinov2_state("small", registers)
    path = tmp_path_factory.mktemp("dinov2") / OFFICIAL_NAMES["small", registers]
    torch.save(state, path)
    reference = timm_model(TIMM_NAMES["small", registers])
    reference.load_state_dict(checkpoint_filter_fn(dict(state), reference), strict=True, assign=True)
    return state, path, reference


def timm_model(name: str, **kwargs):
    """timm's model of that name, 518-px grid, any input size, without its random init (on the meta
    device: every weight is assigned from a state dict afterwards)."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **{"img_size": 518, "dynamic_img_size": True,
                                                                           **kwargs}).eval()


def features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


def assert_features_equal(ours, reference, x):
    out, tokens = features(ours, x), features(reference, x)
    assert out["patches"].shape[1] == (x.shape[-2] // 14) * (x.shape[-1] // 14)  # registers never in patches
    assert (out["patches"] - tokens[:, reference.num_prefix_tokens:]).abs().max() <= 1e-5
    assert (out["cls"] - tokens[:, 0]).abs().max() <= 1e-5
    if ours.num_reg_tokens:
        assert (out["registers"] - tokens[:, 1:reference.num_prefix_tokens]).abs().max() <= 1e-5


def test_official_checkpoint_loads_to_timms_tensors_and_features(official):
    state, path, reference = official
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    model = load_backbone(path)
    assert model.build_spec[0] == TIMM_NAMES["small", registers]  # variant inferred from the keys
    assert model.num_prefix_tokens == 1 + registers and model.patch_size == 14
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()  # mask_token dropped, timm's names
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    if not registers:
        # timm resizes positions with antialiased bicubic; the official model without registers does
        # not (interpolate_offset=0.1, no antialias), so compare timm with our model set to timm's rule
        model = load_backbone(path, pos_interpolation="antialias")
    for size in ((224, 224), NON_SQUARE):
        assert_features_equal(model, reference, torch.randn(1, 3, *size))


def official_positions(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` of the hub models without registers
    (``interpolate_offset=0.1``: scale factors, no antialiasing), transcribed for the test."""
    side, dim = 37, pos_embed.shape[-1]
    h0, w0 = height // 14, width // 14
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic",
                          antialias=False)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)], dim=1)


def test_without_registers_positions_follow_the_official_rule(tmp_path):
    state = official_dinov2_state("small", 0, depth=2)
    torch.save(state, tmp_path / "dinov2_vits14_2blocks.pth")
    model = models.build("vit_small_patch14_dinov2", depth=2).eval()
    assert model.pos_interpolation == "offset"
    load_into(model, tmp_path / "dinov2_vits14_2blocks.pth")
    # timm's model built at that input size, holding the positions the official code computes
    reference = timm_model("vit_small_patch14_dinov2", depth=2, img_size=NON_SQUARE, dynamic_img_size=False)
    converted = checkpoint_filter_fn(dict(state), reference)
    converted["pos_embed"] = official_positions(state["pos_embed"], *NON_SQUARE)
    reference.load_state_dict(converted, strict=True, assign=True)
    assert_features_equal(model, reference, torch.randn(2, 3, *NON_SQUARE))


def test_export_round_trips_through_timm(official, tmp_path):
    state, path, reference = official
    model = load_backbone(path)
    exported = export_backbone(model, tmp_path / "backbone.safetensors")
    name = model.build_spec[0]
    assert read_checkpoint(exported)[1]["arch"] == name
    from safetensors.torch import load_file

    into_timm = timm_model(name)
    into_timm.load_state_dict(load_file(exported), strict=True, assign=True)  # timm's names and shapes, as is
    # timm's own state dict (the timm hub's names of the same weights) loads back to the same model
    torch.save(into_timm.state_dict(), tmp_path / "timm.pth")
    for source in (exported, tmp_path / "timm.pth"):
        again = load_backbone(source)
        assert again.build_spec[0] == name
        for key, value in again.state_dict().items():
            torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0, msg=key)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(features(into_timm, x), features(reference, x), rtol=0, atol=0)


def test_training_checkpoint_with_chunked_blocks_and_heads(tmp_path):
    # DINOv2's trainer saves {"teacher": ...} with backbone blocks in chunks (block_chunks=4) and its heads
    state = official_dinov2_state("small", 4, seed=1)
    chunked = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 3}.{key[len('blocks.'):]}"
        chunked[f"backbone.{key}"] = value
    chunked["dino_head.last_layer.weight_g"] = torch.ones(10, 1)
    torch.save({"teacher": chunked, "iteration": 5}, tmp_path / "teacher_checkpoint.pth")
    torch.save(state, tmp_path / "plain.pth")
    model, plain = load_backbone(tmp_path / "teacher_checkpoint.pth"), load_backbone(tmp_path / "plain.pth")
    assert model.build_spec[0] == "vit_small_patch14_reg4_dinov2"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[key], rtol=0, atol=0, msg=key)


def test_init_into_a_built_model_and_clear_errors(tmp_path):
    state = official_dinov2_state("small", 4, depth=2, seed=2)
    path = tmp_path / "dinov2_vits14_reg4_2blocks.pth"
    torch.save(state, path)
    # what --model.init does: the configured architecture (here trained at 224 px) takes the weights
    model = models.build("vit_small_patch14_reg4_dinov2", depth=2, img_size=224, drop_path=0.1)
    assert load_into(model, path) == ["mask_token"]
    assert model.pos_embed.shape == (1, 16 * 16, 384)  # resized once, with the model's (antialiased) rule
    native = models.build("vit_small_patch14_reg4_dinov2", depth=2).eval()
    load_into(native, path)
    torch.testing.assert_close(model.reg_token, state["register_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(model.cls_token, state["cls_token"] + state["pos_embed"][:, :1], rtol=0, atol=0)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(features(model.eval(), x)["patches"], features(native, x)["patches"],
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"does not implement \(.*ls1.gamma"):
        load_into(models.build("vit_small_patch16", depth=2), path)  # DINO's layout: LayerScale would be ignored
    with pytest.raises(ValueError, match="another shape.*patch_embed.proj.weight"):
        load_into(models.build("vit_small_patch16", depth=2, layer_scale=1.0, reg_tokens=4, no_embed_class=True),
                  path)
