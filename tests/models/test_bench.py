"""models.bench: FLOP count, the table, and one tiny CPU run through every code path."""
import functools
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import bench
from models.registry import MODELS
from models.vit import VisionTransformer


def test_forward_flops_equal_torch_flop_counter():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, attn="math")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vit.forward_features(torch.randn(1, 3, 32, 48))
    assert bench.vit_forward_flops(48, 2, 8, 32, 48) == counter.get_total_flops()


def test_table_ratios_are_against_timm_sdpa_compile():
    result = {"device": "cpu", "torch": "x", "labelprop": [],
              "settings": {"batch_size": 8, "img_size": 224, "precision": "bf16", "lp_size": [480, 864]},
              "train": [{"model": "m", "variant": "timm:sdpa+compile", "img_per_s": 100.0, "mfu": 0.4,
                         "peak_gib": 1.0, "note": ""},
                        {"model": "m", "variant": "ours:sdpa+compile", "img_per_s": 115.0, "mfu": 0.46,
                         "peak_gib": 0.9, "note": ""}]}
    table = bench.format_tables(result)
    assert "| m | ours:sdpa+compile | 115 | 1.15x | 46.0% | 0.90 |" in table
    assert "| m | timm:sdpa+compile | 100 | 1.00x | 40.0% | 1.00 |" in table


def test_tiny_cpu_run_covers_every_variant(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    # A 2-block ViT under a registry name: the same code path as ViT-S/B, at CPU-test cost.
    monkeypatch.setitem(MODELS, "vit_micro", functools.partial(VisionTransformer, embed_dim=48, depth=2, num_heads=3))
    out = tmp_path / "bench.json"
    result = bench.main(["--models", "vit_micro", "--batch-size", "2", "--img-size", "32",
                         "--steps", "1", "--warmup", "1", "--precision", "fp32", "--device", "cpu",
                         "--compile-backend", "aot_eager", "--lp-models", "vit_micro",
                         "--lp-size", "160", "160", "--json", str(out)])
    rows = {row["variant"]: row for row in result["train"]}
    assert set(rows) == set(bench.VARIANTS)
    ran = [v for v in bench.VARIANTS if "xformers" not in v]
    assert all(rows[v]["img_per_s"] > 0 for v in ran)
    assert all(rows[v]["note"].startswith("skipped") for v in bench.VARIANTS if "xformers" in v)
    assert [(r["backend"], r["attention_maps"]) for r in result["labelprop"]] == [
        ("math", False), ("math", True), ("auto", False), ("auto", True)]
    attention_matrix_mib = 3 * 101 ** 2 * 4 / 2**20  # heads x tokens² float32, the largest tensor of math
    largest = [r["largest_tensor_mib"] for r in result["labelprop"]]
    assert largest[0] == largest[1] == largest[3] == pytest.approx(attention_matrix_mib)
    assert largest[2] < attention_matrix_mib / 1.5  # the fused path never holds a tokens x tokens matrix
    assert json.loads(out.read_text())["settings"]["batch_size"] == 2
    with pytest.raises(ValueError, match="impl:backend"):
        bench.make_variant("vit_micro", "ours:eager", 32, torch.device("cpu"))
