"""Generic fine-tuning: model.init, model.trainable, backbone LR multiplier and frozen-until-step."""
import json

import pytest
import torch
import yaml

import models
from train import run
from train.config import ConfigError, load_config
from train.finetune import backbone_lr_mult, freeze_backbone, load_init, matches, prepare_backbone
from train.objectives import OBJECTIVES
from train.objectives.dino import DINOConfig
from train.optim import param_groups, set_lr_wd

TINY_DINO = DINOConfig(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, global_size=32, local_size=16,
                       local_crops=0, freeze_last_layer_epochs=0)


def tiny_dino():
    torch.manual_seed(0)
    return OBJECTIVES["dino"](TINY_DINO, arch="vit_tiny_patch16", total_steps=10, steps_per_epoch=5)


def pretrained(arch="vit_tiny_patch16", seed=7):
    """A backbone state dict in the official DINO layout (timm names), random weights."""
    torch.manual_seed(seed)
    return models.build(arch).state_dict()


def images(seed=3):
    return {"global": torch.randn(2, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def test_prefixes_match_whole_name_components():
    assert matches("blocks.1.mlp.fc1.weight", ("blocks.1",))
    assert not matches("blocks.10.mlp.fc1.weight", ("blocks.1",))
    assert matches("norm.weight", ("norm.weight",)) and not matches("norm.weight", ("blocks",))


def test_config_keys_parse_lists_and_make_the_init_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("dino", overrides={"data.path": "/d", "model.init": "w.pth",
                                         "model.trainable": "blocks.10,blocks.11"})
    assert cfg.model.init == str(tmp_path / "w.pth")
    assert cfg.model.trainable == ("blocks.10", "blocks.11")
    again = load_config("dino", overrides={"data.path": "/d", "model.trainable": "[blocks.11]"})
    assert again.model.trainable == ("blocks.11",) and again.model.init == ""
    cfg.dump(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["trainable"] == ["blocks.10", "blocks.11"]
    with pytest.raises(ConfigError, match="backbone_lr_mult"):
        load_config("dino", overrides={"data.path": "/d", "optim.backbone_lr_mult": "-1"})


@pytest.mark.parametrize("layout", ["plain", "dino_training", "densevid_export"])
def test_init_loads_student_and_restarts_teacher(layout, tmp_path):
    state = pretrained()
    path = tmp_path / "weights.pth"
    if layout == "plain":  # dino_deitsmall16_pretrain.pth
        torch.save(state, path)
    elif layout == "dino_training":  # checkpoint.pth of main_dino.py: the teacher's weights are used
        student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
        teacher = {f"backbone.{k}": v for k, v in state.items()} | {"head.mlp.0.weight": torch.zeros(3, 3)}
        torch.save({"student": student, "teacher": teacher, "epoch": 3}, path)
    else:
        model = models.build("vit_tiny_patch16")
        model.load_state_dict(state)
        path = models.io.export_backbone(model, tmp_path / "backbone.safetensors")
    objective = tiny_dino()
    head_before = [p.clone() for p in objective.student_head.parameters()]
    note = load_init(objective, str(path))
    assert note.startswith(f"backbone from {path} ({len(state)} tensors")
    for name, value in state.items():
        assert torch.equal(objective.student.state_dict()[name], value), name
        assert torch.equal(objective.teacher.net.state_dict()[name], value), name
    assert all(torch.equal(a, b) for a, b in zip(head_before, objective.student_head.parameters()))
    for p, q in zip(objective.student_head.parameters(), objective.teacher_head.parameters()):
        assert torch.equal(p, q)


def test_init_errors_name_the_keys(tmp_path):
    state = pretrained()
    missing = {k: v for k, v in state.items() if k != "blocks.3.norm1.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"lacks 1 weights of the model \(blocks.3.norm1.weight\)"):
        load_init(tiny_dino(), str(tmp_path / "missing.pth"))
    torch.save({**state, "blocks.0.ls1.gamma": torch.ones(192)}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match=r"1 weights this model does not implement \(blocks.0.ls1.gamma\)"):
        load_init(tiny_dino(), str(tmp_path / "foreign.pth"))
    torch.save(pretrained("vit_small_patch16"), tmp_path / "small.pth")
    with pytest.raises(ConfigError, match=r"other shapes than vit_tiny_patch16's .*looks like vit_small_patch16"):
        load_init(tiny_dino(), str(tmp_path / "small.pth"))
    with pytest.raises(ConfigError, match="model.init: checkpoint .*nowhere.pth does not exist"):
        load_init(tiny_dino(), str(tmp_path / "nowhere.pth"))


def test_trainable_blocks_alone_get_gradients():
    objective = tiny_dino()
    note = freeze_backbone(objective, ("blocks.11",))
    assert note.startswith("12 of ")
    loss, _ = objective(images())
    loss.backward()
    for name, p in objective.student.named_parameters():
        assert (p.grad is not None) == name.startswith("blocks.11."), name
        assert p.requires_grad == name.startswith("blocks.11."), name
    assert all(p.grad is not None for p in objective.student_head.mlp.parameters())
    with pytest.raises(ConfigError, match="model.trainable: blocks.12 match.*no backbone parameter"):
        freeze_backbone(tiny_dino(), ("blocks.12",))


def test_prepare_backbone_skips_init_on_resume_and_says_random_init(tmp_path):
    cfg = load_config("dino", overrides={"data.path": "/d", "model.init": str(tmp_path / "absent.pth")})
    assert prepare_backbone(tiny_dino(), cfg.model, fresh=False) == "weights from the checkpoint"
    cfg = load_config("dino", overrides={"data.path": "/d", "model.trainable": "blocks.11"})
    assert prepare_backbone(tiny_dino(), cfg.model, fresh=True).startswith("random init; 12 of ")


def test_backbone_groups_follow_the_multiplier_and_stay_still_until_the_frozen_step():
    cfg = load_config("dino", overrides={"data.path": "/d", "optim.backbone_lr_mult": "0.1",
                                         "optim.backbone_frozen_steps": "2"}).optim
    assert [backbone_lr_mult(cfg, s) for s in (0, 1, 2, 3)] == [0.0, 0.0, 0.1, 0.1]
    objective = tiny_dino()
    groups = param_groups(objective, objective.student)
    assert [(g["backbone"], g["decay"]) for g in groups] == [(False, True), (False, False), (True, True), (True, False)]
    in_backbone = {id(p) for g in groups if g["backbone"] for p in g["params"]}
    assert in_backbone == {id(p) for p in objective.student.parameters()}
    opt = torch.optim.AdamW(groups, lr=1.0, weight_decay=0.0)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in objective.named_parameters()}
        set_lr_wd(opt, 1e-3, 0.0, backbone_lr_mult(cfg, step))
        assert sorted({g["lr"] for g in opt.param_groups}) == sorted({1e-3, 1e-3 * backbone_lr_mult(cfg, step)})
        loss, _ = objective(images(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved = {n: (p - before[n]).abs().max().item() for n, p in objective.named_parameters() if p.requires_grad}
        backbone = [v for n, v in moved.items() if n.startswith("student.")]
        head = [v for n, v in moved.items() if n.startswith("student_head.mlp")]
        if step < 2:
            assert max(backbone) == 0.0 and max(head) > 0  # gradients flow, the LR is 0
        else:  # Adam moves each weight by about lr at most: the backbone 10x less than the head
            assert 0 < max(backbone) <= 1.01e-4 < max(head)


def test_run_records_the_init_and_trains_only_the_named_blocks(jpeg_shards, tmp_path, capsys):
    from tests.train.test_run import argv

    model = models.build("vit_tiny_patch16")
    init = models.io.export_backbone(model, tmp_path / "pretrained.safetensors")
    out = tmp_path / "run"
    assert run.main(argv("dino", jpeg_shards, out, 2, "--model.init", str(init), "--model.trainable", "blocks.11",
                         "--optim.backbone_lr_mult", "0.1", "--optim.warmup_epochs", "0")) == 0
    printed = capsys.readouterr().out
    assert f"fresh start | backbone from {init} (" in printed and "12 of 150 backbone tensors train" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert (saved["init"], saved["trainable"]) == (str(init), ["blocks.11"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["backbone_lr"] == pytest.approx(0.1 * records[0]["lr"])
    trained = models.io.load_backbone(out / "checkpoints/step-000002/model.safetensors", which="student")
    for name, value in trained.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]) != name.startswith("blocks.11."), name
    assert run.main(argv("dino", jpeg_shards, tmp_path / "scratch", 1)) == 0
    assert "fresh start | random init" in capsys.readouterr().out


def test_init_from_an_official_dinov2_checkpoint_and_train_a_step(tmp_path):
    from tests.models.dinov2_checkpoints import official_dinov2_state

    state = official_dinov2_state("small", 4)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state, path)
    torch.manual_seed(0)
    cfg = DINOConfig(**{**TINY_DINO.__dict__, "global_size": 28, "local_size": 14})
    objective = OBJECTIVES["dino"](cfg, arch="vit_small_patch14_reg4_dinov2", total_steps=10, steps_per_epoch=5)
    note = load_init(objective, str(path))
    assert "1 non-backbone entries skipped" in note  # mask_token
    # the official registers layout arrives in timm's: reg_token, CLS position folded into cls_token
    torch.testing.assert_close(objective.student.reg_token, state["register_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(objective.teacher.net.cls_token, state["cls_token"] + state["pos_embed"][:, :1],
                               rtol=0, atol=0)
    batch = {"global": torch.randn(2, 2, 1, 3, 28, 28, generator=torch.Generator().manual_seed(3))}
    loss, _ = objective(batch)
    loss.backward()
    assert torch.isfinite(loss) and objective.student.blocks[11].ls2.gamma.grad.abs().sum() > 0
