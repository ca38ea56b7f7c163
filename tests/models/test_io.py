"""Checkpoint import (DINO, timm, CRW, our exports) and export to a timm-loadable safetensors file."""
import argparse
import logging

import pytest
import torch

import models
from models.heads import DINOHead
from models.io import export_backbone, load_backbone, read_checkpoint

CODE_RAN = []


def record_code_ran(tag):
    CODE_RAN.append(tag)
    return tag


class Payload:
    """Unpickling this calls a function: stands in for code hidden in a checkpoint."""

    def __reduce__(self):
        return record_code_ran, ("payload",)


@pytest.fixture(scope="module")
def vit_pair():
    torch.manual_seed(0)
    return models.build("vit_tiny_patch16").eval(), models.build("vit_tiny_patch16").eval()


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_dino_training_checkpoint_loads_teacher_or_student(tmp_path, vit_pair):
    student, teacher = vit_pair
    head = DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    checkpoint = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.head.{k}": v for k, v in head.state_dict().items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    **{f"head.{k}": v for k, v in head.state_dict().items()}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=5e-4),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert_same_weights(load_backbone(path), teacher)                   # arch inferred, teacher by default
    assert_same_weights(load_backbone(path, which="student"), student)
    assert_same_weights(load_backbone(path, arch="vit_tiny_patch16", attn="math"), teacher)
    # A flat objective state (as accelerate saves densevid's DINO objective) in safetensors.
    from safetensors.torch import save_file

    flat = {**{f"student.{k}": v for k, v in student.state_dict().items()},
            **{f"teacher.net.{k}": v for k, v in teacher.state_dict().items()},
            **{f"teacher_head.net.{k}": v for k, v in head.state_dict().items()}, "center": torch.zeros(1, 64)}
    save_file(flat, tmp_path / "model.safetensors")
    assert_same_weights(load_backbone(tmp_path / "model.safetensors"), teacher)
    assert_same_weights(load_backbone(tmp_path / "model.safetensors", which="student"), student)


def test_pickled_code_runs_only_with_trust_flag(tmp_path, vit_pair):
    path = tmp_path / "untrusted.pth"
    torch.save({"teacher": vit_pair[1].state_dict(), "extra": Payload()}, path)
    CODE_RAN.clear()
    with pytest.raises(RuntimeError, match="trust_pickle=True"):
        load_backbone(path)
    assert CODE_RAN == []
    assert_same_weights(load_backbone(path, trust_pickle=True), vit_pair[1])
    assert CODE_RAN == ["payload"]


def test_export_loads_into_timm_and_gives_the_same_features(tmp_path, vit_pair):
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    from safetensors.torch import load_file

    model = vit_pair[0]
    path = export_backbone(model, tmp_path / "backbone.safetensors")
    metadata = read_checkpoint(path)[1]
    assert metadata["arch"] == "vit_tiny_patch16" and "attn" not in metadata["kwargs"]
    timm_vit = vision_transformer.VisionTransformer(embed_dim=192, depth=12, num_heads=3, num_classes=0).eval()
    timm_vit.load_state_dict(load_file(path), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = timm_vit.forward_features(x)
        out = model.forward_features(x)
        reloaded = load_backbone(path).forward_features(x)
    torch.testing.assert_close(out["patches"], expected[:, 1:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out["cls"], expected[:, 0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(reloaded["patches"], out["patches"], rtol=0, atol=0)
    # A torch.compile wrapper (lazy: nothing is compiled here) exports the same keys and arch.
    wrapped = export_backbone(torch.compile(model), tmp_path / "compiled.safetensors")
    assert load_file(wrapped).keys() == load_file(path).keys()
    assert read_checkpoint(wrapped)[1]["arch"] == "vit_tiny_patch16"


def test_timm_state_dict_with_classifier_and_resized_positions(tmp_path, caplog):
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    timm_vit = vision_transformer.VisionTransformer(img_size=256, embed_dim=192, depth=12, num_heads=3,
                                                    num_classes=10).eval()
    path = tmp_path / "timm.pth"
    torch.save(timm_vit.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="models.io"):
        model = load_backbone(path)
    assert "skipped 2 entries" in caplog.text and "head.weight" in caplog.text
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 192)  # native grid read from the weights
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)["patches"], timm_vit.forward_features(x)[:, 1:],
                                   atol=2e-5, rtol=1e-4)
    resized = load_backbone(path, img_size=224)  # a different native size: positions interpolated
    assert resized.pos_embed.shape == (1, 1 + 14 * 14, 192)
    torch.testing.assert_close(resized.pos_embed[:, 0], timm_vit.pos_embed[:, 0])


def test_selfpatch_training_checkpoint_without_cls_token_or_final_norm(tmp_path):
    """SelfPatch's layout: MultiCropWrapper keys (module.backbone.*) of a ViT with neither a CLS token
    nor a final LayerNorm, next to its class-attention head; the backbone is rebuilt without both."""
    torch.manual_seed(0)
    selfpatch = models.build("vit_tiny_patch16", class_token=False, final_norm=False).eval()
    teacher = {f"module.backbone.{k}": v for k, v in selfpatch.state_dict().items()}
    teacher["module.ca_head.cls_token"] = torch.zeros(1, 1, 192)
    path = tmp_path / "selfpatch.pth"
    torch.save({"teacher": teacher}, path)
    model = load_backbone(path)
    assert model.cls_token is None and isinstance(model.norm, torch.nn.Identity)
    assert_same_weights(model, selfpatch)


def test_crw_checkpoint_and_test_time_layer_removal(tmp_path):
    torch.manual_seed(0)
    encoder = models.build("resnet18_crw").eval()
    checkpoint = {"model": {**{f"encoder.model.{k}": v for k, v in encoder.state_dict().items()},
                            "selfsim_fc.weight": torch.zeros(128, 512), "selfsim_fc.bias": torch.zeros(128)},
                  "epoch": 2}
    path = tmp_path / "crw.pth"
    torch.save(checkpoint, path)
    assert_same_weights(load_backbone(path), encoder)
    test_time = load_backbone(path, remove_layers=["layer4"])
    encoder_copy = models.build("resnet18_crw")
    encoder_copy.load_state_dict(encoder.state_dict())
    encoder_copy.remove_layers(["layer4"])  # after build: the export must still record it
    exported = load_backbone(export_backbone(encoder_copy, tmp_path / "crw.safetensors"))
    assert exported.out_channels == 256 and exported.state_dict().keys() == test_time.state_dict().keys()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(test_time(x), encoder.layer3(encoder.layer2(encoder.layer1(
            encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))))))


def test_wrong_architecture_names_the_missing_weights(tmp_path, vit_pair):
    path = tmp_path / "tiny.pth"
    state = {k: v for k, v in vit_pair[0].state_dict().items() if not k.startswith("blocks.11.")}
    state["blocks.11.norm1.weight"] = torch.ones(192)  # keeps depth 12 so the arch is still inferred
    torch.save(state, path)
    with pytest.raises(ValueError, match="lacks 11 weights"):
        load_backbone(path)
    layer_scale = dict(vit_pair[0].state_dict(), **{"blocks.0.ls1.gamma": torch.ones(192)})  # DINOv2-style
    torch.save(layer_scale, path)
    with pytest.raises(ValueError, match=r"does not implement \(blocks.0.ls1.gamma\)"):
        load_backbone(path)
    (tmp_path / "truncated.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="truncated.pth is not a readable torch checkpoint"):
        load_backbone(tmp_path / "truncated.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(tmp_path / "nope.pth")


def test_half_precision_checkpoint_loads_as_float32(tmp_path, vit_pair):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in vit_pair[0].state_dict().items()}, path)
    model = load_backbone(path)
    tensors = list(model.state_dict().values())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)  # nothing left on meta
    torch.testing.assert_close(model.pos_embed, vit_pair[0].pos_embed.half().float())
    assert all(p.requires_grad for p in model.parameters())
