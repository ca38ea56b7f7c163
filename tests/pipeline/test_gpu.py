"""The GPU path (DALI mixed decoders + roi_align rendering) against the CPU path. Needs CUDA."""
import itertools

import pytest
import torch

from pipeline import DataConfig, MulticropViews, build_loader
from pipeline.views import crop_resize

pytestmark = pytest.mark.gpu


def test_roi_align_crops_match_the_cpu_resize_on_smooth_images():
    y, x = torch.meshgrid(torch.arange(120.0), torch.arange(200.0), indexing="ij")
    frames = torch.stack([x, y * 2, (x + y) / 1.3], 0).clamp(0, 255).to(torch.uint8).expand(4, -1, -1, -1)
    boxes = torch.tensor([[0, 0, 200, 120], [13, 7, 150, 101], [50, 20, 90, 60], [3, 3, 190, 30]])
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    for size in (32, 64, 96):
        cpu = crop_resize(frames, boxes, ids, size).float()
        gpu = crop_resize(frames.cuda(), boxes.cuda(), ids.cuda(), size).float().cpu()
        inner = (slice(None),) * 3 + (slice(2, -2), slice(2, -2))    # edges: the filters clip differently
        assert (cpu[inner] - gpu[inner]).abs().max() <= 2.0


@pytest.mark.dali
@pytest.mark.parametrize("fixture", ["jpeg_shards", "h264_shards"])
def test_gpu_loader_matches_the_cpu_loader(request, fixture):
    path = str(request.getfixturevalue(fixture))
    spec = MulticropViews(frames=2, stride=4, global_size=32, local_size=16, local_crops=2)
    out = {}
    for backend, device in (("dali", "cuda"), ("cpu", "cpu")):
        cfg = DataConfig(path=path, batch_size=3, backend=backend, device=device, num_workers=1, dtype="float32")
        out[backend] = list(itertools.islice(iter(build_loader(cfg, spec, 0, 1)), 2))
    for a, b in zip(out["dali"], out["cpu"]):
        assert a["global"].is_cuda and torch.equal(a["sample"].cpu(), b["sample"])
        for k in ("global", "local"):
            assert (a[k].cpu() - b[k]).abs().mean() < 0.05
