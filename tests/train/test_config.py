"""Configuration: YAML defaults, layering, type checks, unknown keys, and the generated CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import DERIVED, ConfigError, load_config
from train.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_method_yaml_loads_and_round_trips(method, tmp_path):
    cfg = load_config(method, overrides={"data.path": "/data"})
    assert cfg.model.arch == OBJECTIVES[method].default_arch
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(method, str(tmp_path / "config.yaml"))
    assert again.to_dict() == cfg.to_dict()


def test_paper_defaults():
    crw = load_config("crw", overrides={"data.path": "/d"})
    assert (crw.objective.temperature, crw.objective.edge_dropout, crw.objective.clip_len) == (0.05, 0.1, 4)
    assert (crw.objective.min_walk_length, crw.objective.dropout_shared) == (1, False)
    assert (crw.optim.lr, crw.optim.weight_decay, crw.optim.clip_grad) == (1e-4, 0.0, 0.0)
    dino = load_config("dino", overrides={"data.path": "/d"})
    d = dino.objective
    assert (d.out_dim, d.teacher_temp, d.momentum_teacher, d.local_crops) == (65536, 0.04, 0.996, 8)
    assert (dino.optim.lr, dino.optim.lr_reference_batch, dino.optim.clip_mode) == (5e-4, 256, "per_param")
    assert dino.model.drop_path == 0.1
    timet = load_config("timet", overrides={"data.path": "/d"})
    t = timet.objective
    assert (t.num_prototypes, t.clip_len, t.size, t.teacher, t.sinkhorn_iterations, t.ff_context) == (
        200, 4, 224, "ema", 10, 7)
    assert (timet.data.batch_size, timet.optim.lr, timet.optim.backbone_lr_mult, timet.optim.lr_scaling) == (
        128, 1e-4, 0.1, "none")
    assert timet.model.trainable == ("blocks.10", "blocks.11") and timet.model.arch == "vit_small_patch16"


def test_layers_apply_in_order(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "min_lr": 1e-5}, "dino": {"local_crops": 6}}))
    cfg = load_config("dino", str(user), {"data.path": "/d", "optim.lr": "2e-3", "dino.global_scale": "[0.3, 1]"})
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.objective.local_crops) == (2e-3, 1e-5, 6)
    assert cfg.objective.global_scale == (0.3, 1.0)


@pytest.mark.parametrize("overrides,message", [
    ({"optim.lrr": 1}, "command line: unknown key.*optim.lrr.*valid keys of 'optim'"),
    ({"optimizer.lr": 1}, "unknown section 'optimizer'"),
    ({"run.steps": "1.5"}, "run.steps: expected int"),
    ({"crw.norm_stats": "foo"}, "crw.norm_stats: 'foo' is not one of"),
    ({"crw.crop_scale": "[0.5]"}, "expected a list of 2 values"),
    ({"data.backend": "gpu"}, "backend"),
    ({"dino.out_dim": 5}, "unknown section 'dino'"),
    ({"run.ckpt_every": 0}, "run.ckpt_every .* must be >= 1"),
    ({"optim.accum_steps": 0}, "optim.accum_steps .* must be >= 1"),
])
def test_bad_values_fail_fast(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("crw", overrides={"data.path": "/d", **overrides})


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("crw:\n  temprature: 0.07\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) crw.temprature"):
        load_config("crw", str(bad), {"data.path": "/d"})


def test_missing_data_path_says_how_to_fix():
    with pytest.raises(ConfigError, match=r"data.path must be set \(--data DIR\)"):
        load_config("crw")


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "train/run.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    for method in OBJECTIVES:
        for section, values in load_config(method, overrides={"data.path": "/d"}).to_dict().items():
            for key in values if isinstance(values, dict) else []:
                assert (f"--{section}.{key}" in out) != ((section, key) in DERIVED)
    assert "Softmax temperature of the transitions" in out  # field docstrings become the help text
    assert "torchrun --nproc_per_node" in out


def test_cli_rejects_other_methods_options(tmp_path):
    from train import run

    with pytest.raises(ConfigError, match="--dino.out_dim belongs to method 'dino' but --method is crw"):
        run.main(["--method", "crw", "--data", "/d", "--out", str(tmp_path), "--dino.out_dim", "8"])
