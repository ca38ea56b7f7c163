"""Backbone loading and feature extraction for evaluation."""
import pytest
import torch

import models
from eval import features as ft
from models.io import export_backbone


def test_dense_features_vit_and_resnet():
    frames = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    vit = models.build("vit_tiny_patch16").eval()
    fmap = ft.dense_feature_fn(vit)(frames)
    assert fmap.shape == (2, vit.embed_dim, 2, 3) and ft.feature_stride(vit) == 16
    torch.testing.assert_close(fmap.norm(dim=1), torch.ones(2, 2, 3))
    # the last block's patch tokens after the final norm, in raster order (CLS dropped)
    tokens = vit.forward_features(ft.normalise_frames(frames))["patches"]
    expected = torch.nn.functional.normalize(tokens, dim=-1).transpose(1, 2).reshape(2, -1, 2, 3)
    torch.testing.assert_close(fmap, expected, rtol=1e-4, atol=1e-5)
    resnet = models.build("resnet18_crw").eval()
    cnn = ft.dense_feature_fn(resnet)(frames)
    assert cnn.shape == (2, resnet.out_channels, 4, 6) and ft.feature_stride(resnet) == 8


def test_dense_features_drop_registers_and_upsample():
    from models.vit import VisionTransformer

    frames = torch.randint(0, 256, (2, 28, 42, 3), dtype=torch.uint8)
    vit = VisionTransformer(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=3, layer_scale=0.5,
                            reg_tokens=4, no_embed_class=True).eval()
    tokens = vit.forward_features(ft.normalise_frames(frames))["patches"]          # (2, 6, 48), no registers
    raw = tokens.transpose(1, 2).reshape(2, -1, 2, 3)
    torch.testing.assert_close(ft.dense_feature_fn(vit)(frames), torch.nn.functional.normalize(raw, dim=1))
    up = ft.dense_feature_fn(vit, upsample=2)(frames)
    expected = torch.nn.functional.interpolate(raw, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == (2, 48, 4, 6)
    torch.testing.assert_close(up, torch.nn.functional.normalize(expected, dim=1))  # normalised after upsampling
    pooled = ft.global_descriptor(vit, frames, avgpool=True)
    torch.testing.assert_close(pooled[:, 48:], vit.forward_features(ft.normalise_frames(frames))["patches"].mean(1))


def test_global_descriptor_concatenates_blocks():
    vit = models.build("vit_tiny_patch16").eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert ft.global_descriptor(vit, images).shape == (3, vit.embed_dim)
    assert ft.global_descriptor(vit, images, n_last_blocks=4, avgpool=True).shape == (3, 5 * vit.embed_dim)


def test_load_backbone_from_run_dir_and_file(tmp_path):
    vit = models.build("vit_tiny_patch16")
    export_backbone(vit, tmp_path / "backbone.safetensors")
    for source in (tmp_path, tmp_path / "backbone.safetensors"):
        loaded = ft.load_backbone(source)
        torch.testing.assert_close(loaded.state_dict()["pos_embed"], vit.state_dict()["pos_embed"])
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    with pytest.raises(FileNotFoundError, match="backbone.safetensors"):
        ft.load_backbone(empty_run)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ft.load_backbone(tmp_path / "nowhere.pth")


def test_crw_encoder_is_evaluated_on_layer3(tmp_path):
    """A CRW run exports the trained encoder with layer4; evaluation reads layer3 as videowalk does."""
    trained = models.build("resnet18_crw").eval()
    export_backbone(trained, tmp_path / "backbone.safetensors")
    loaded = ft.load_backbone(tmp_path)
    assert loaded.stages == ["layer1", "layer2", "layer3"] and loaded.out_channels == 256
    frames = torch.randint(0, 256, (1, 32, 48, 3), dtype=torch.uint8)
    x = ft.normalise_frames(frames)
    with torch.inference_mode():
        stem = trained.maxpool(trained.relu(trained.bn1(trained.conv1(x))))
        layer3 = trained.layer3(trained.layer2(trained.layer1(stem)))
    expected = torch.nn.functional.normalize(layer3, dim=1)
    torch.testing.assert_close(ft.dense_feature_fn(loaded)(frames), expected, rtol=1e-4, atol=1e-5)


def test_smtc_export_is_evaluated_on_unnormed_last_block_tokens(tmp_path):
    """SMTC builds its encoder with dense_norm=False; the export records it and eval follows (§3.e)."""
    trained = models.build("vit_tiny_patch16", dense_norm=False).eval()
    export_backbone(trained, tmp_path / "backbone.safetensors")
    loaded = ft.load_backbone(tmp_path)
    assert loaded.dense_norm is False
    frames = torch.randint(0, 256, (1, 32, 48, 3), dtype=torch.uint8)
    tokens = trained.forward_features(ft.normalise_frames(frames), norm=False)["patches"]
    expected = torch.nn.functional.normalize(tokens, dim=-1).transpose(1, 2).reshape(1, -1, 2, 3)
    torch.testing.assert_close(ft.dense_feature_fn(loaded)(frames), expected, rtol=1e-4, atol=1e-5)


def test_video_slots_runs_clips_of_consecutive_frames():
    from models.slots import SlotAttention, SMTCSlots

    assert ft.clip_starts(5, 3) == [0, 2] and ft.clip_starts(6, 3) == [0, 3] and ft.clip_starts(2, 4) == [0]
    torch.manual_seed(0)
    network = SMTCSlots(models.build("vit_tiny_patch16"), (2, 2), SlotAttention(3, 192, 2, 2, 192)).eval()
    frames = torch.randint(0, 256, (5, 32, 48, 3), dtype=torch.uint8)
    noise = torch.randn(3, 2, 192)
    out = ft.video_slots(network, frames, 3, noise, clips_per_forward=2)
    assert out["instance_logits"].shape == (5, 3, 2, 6) and out["semantic_slots"].shape == (5, 3, 192)
    init = network.slot_attention.instances_from_noise(noise).expand(3, -1, -1, -1)
    with torch.no_grad():  # frames 3 and 4 come from the clip of frames 2-4, frames 0-2 from the first
        last = network(ft.normalise_frames(frames[2:])[None], init)
        first = network(ft.normalise_frames(frames[:3])[None], init)
    torch.testing.assert_close(out["instance_logits"][3:], last["instance_logits"][0, 1:])
    torch.testing.assert_close(out["semantic_logits"][:3], first["semantic_logits"][0])
