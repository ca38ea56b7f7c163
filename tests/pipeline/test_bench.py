import dataclasses
import json

import pytest
import torch

from pipeline import DataConfig, build_loader
from pipeline.bench import FAMILIES, BaselineClips, main, process_tree_cpu_seconds

SMALL = {"multicrop": dict(frames=2, global_size=32, local_size=16, local_crops=3),
         "grid": dict(frames=2, size=64, patch_size=16, patch_stride=8),
         "clip": dict(frames=3, size=32)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_baseline_builds_the_views_our_loader_builds(ramp_shards, family):
    spec = dataclasses.replace(FAMILIES[family], stride=2, **SMALL[family])
    ours = next(iter(build_loader(DataConfig(path=str(ramp_shards), batch_size=2, num_workers=0, device="cpu"),
                                  spec, 0, 1)))
    theirs = torch.utils.data.default_collate([BaselineClips(str(ramp_shards), spec)[i] for i in range(2)])
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items() if k != "sample"}
    assert all(theirs[k].dtype == ours[k].dtype for k in theirs)


def test_bench_reports_rows_as_json(ramp_shards, capsys):
    argv = ["--data", str(ramp_shards), "--family", "clip", "--frames", "2", "--stride", "2", "--paths", "cpu",
            "baseline", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--workers", "0", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == ["baseline", "cpu"]
    for row in rows:
        assert row["clips_per_s"] > 0 and abs(row["frames_per_s"] - 2 * row["clips_per_s"]) <= 0.2
        assert row["gpu_pct"] is None and row["decoder"] == "pil" and row["T"] == 2
    assert rows[0]["speedup"] == 1.0


def test_cpu_time_of_the_process_tree_grows_with_work():
    before = process_tree_cpu_seconds()
    sum(i * i for i in range(3_000_000))
    assert process_tree_cpu_seconds() - before > 0.05


def test_gpu_monitor_reads_the_gpu_torch_uses():
    # NVML ignores CUDA_VISIBLE_DEVICES: torch's cuda:0 under CUDA_VISIBLE_DEVICES=5,3 is NVML's GPU 5
    from pipeline.bench import nvml_device_id

    assert nvml_device_id(0, None) == 0 and nvml_device_id(1, "") == 1
    assert nvml_device_id(0, "5,3") == 5 and nvml_device_id(1, "5, 3") == 3
    assert nvml_device_id(0, "GPU-8f2c1e4a-0000-1111-2222-333344445555") == "GPU-8f2c1e4a-0000-1111-2222-333344445555"
