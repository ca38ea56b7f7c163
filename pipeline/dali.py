"""The DALI decode graph: one graph for GPU (nvJPEG / NVDEC, `device="mixed"`) and CPU
(`device_id=None`, JPEG and VP9).

    external_source(parallel, batch)  Python workers (spawned): plan B samples with
        |                             `pipeline.source.ClipSource` (epoch order, parameters,
        |                             corrupt-sample replacement) and slice the T encoded frames
        |                             of each out of the mmap'ed shard (or the whole mp4/webm)
    decoders.image / decoders.video   B*T JPEGs in one batched decode, or B containers decoded
        |                             from the planned start at stride S (`pad_mode="edge"` is
        |                             only a guard: starts always leave room for the span)
    pad                               frames of different sizes to one batch shape
    -> torch (zero-copy on the GPU) -> pipeline.views.render on the device

DALI does the decode, the part torch cannot do fast; the views are rendered by the same torch code
as on the CPU path, so both backends build identical views from identical parameters (the packed
parameter rows travel through the graph next to the frames). DALI 2.4 has no per-sample `select`,
so picking T of a sample's frames happens in the workers, on encoded bytes.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.source import ClipSource


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise ImportError("the DALI backend needs NVIDIA DALI: pip install 'densevid[gpu]'") from err
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    return fn, pipeline_def, types, DALIGenericIterator


class BatchCallback:
    """The external source: DALI batch `info.iteration` -> encoded frames and packed rows.

    JPEG samples give B*T outputs (one per frame, each with its sample's row) so that one
    `decoders.image` call decodes the whole batch; video samples give B containers, their rows and
    their start frames.
    """

    def __init__(self, source: ClipSource, batch_size: int, start: int):
        self.source, self.batch_size, self.start = source, batch_size, start

    def __call__(self, info) -> tuple:
        first = self.start + info.iteration * self.batch_size
        encoded, rows, starts = [], [], []
        for position in range(first, first + self.batch_size):
            planned, _ = self.source.plan(position)   # skips are counted in the row's meta
            if self.source.dataset.format == "jpeg":
                encoded += planned.frames
                rows += [planned.row] * len(planned.frames)
            else:
                encoded.append(planned.frames[0])
                rows.append(planned.row)
                starts.append(np.array(planned.indices[0], dtype=np.int32))
        if self.source.dataset.format == "jpeg":
            return encoded, rows
        return encoded, rows, starts


def dali_device_id(device: str) -> int:
    """The GPU the DALI graph runs on: the one `device` names ("cuda:1" -> 1), else torch's current one,
    so the outputs land on the training device without a device-to-device copy."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def build_graph(callback: BatchCallback, cfg: DataConfig, on_gpu: bool):
    """The DALI pipeline for one rank (not yet built)."""
    fn, pipeline_def, types, _ = _import_dali()
    source = callback.source
    spec, video = source.spec, source.dataset.format != "jpeg"
    device = "mixed" if on_gpu else "cpu"
    per_batch = cfg.batch_size if video else cfg.batch_size * spec.frames
    workers = max(1, cfg.num_workers)

    # spawn, not fork: the training process has usually initialised CUDA before it builds the loader
    @pipeline_def(batch_size=per_batch, num_threads=cfg.num_threads,
                  device_id=dali_device_id(cfg.device) if on_gpu else None,
                  py_num_workers=workers, py_start_method="spawn",
                  prefetch_queue_depth=cfg.prefetch, seed=cfg.seed)
    def graph():
        # A batch callback runs in one worker; only batches queued ahead run concurrently, so the
        # queue must be at least as deep as the worker pool (DALI's default depth, 1, uses one worker).
        outputs = fn.external_source(source=callback, num_outputs=3 if video else 2, parallel=True,
                                     batch=True, batch_info=True, prefetch_queue_depth=max(cfg.prefetch, workers),
                                     dtype=[types.UINT8, types.FLOAT64] + ([types.INT32] if video else []))
        if video:
            encoded, rows, starts = outputs
            frames = fn.decoders.video(encoded, device=device, start_frame=starts, sequence_length=spec.frames,
                                       stride=spec.stride, pad_mode="edge")
            frames = fn.pad(frames, axes=(1, 2))
        else:
            encoded, rows = outputs
            frames = fn.decoders.image(encoded, device=device, output_type=types.RGB)
            frames = fn.pad(frames, axes=(0, 1))
        # fn.copy: DALI 2.x can corrupt parallel external-source outputs returned directly.
        return frames, fn.copy(rows)

    return graph()


def dali_batches(source: ClipSource, cfg: DataConfig, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Endless (frames (B*T, H, W, 3) uint8 on `cfg.device`, rows (B, P) float64, skipped ids) batches.

    A row records how many samples were skipped before it and the last of them, so a skip is
    counted under that sample's name (the others of a rare multi-skip are in the worker's log)."""
    *_, DALIGenericIterator = _import_dali()
    on_gpu = cfg.device.startswith("cuda") and torch.cuda.is_available()
    pipe = build_graph(BatchCallback(source, cfg.batch_size, start), cfg, on_gpu)
    T, video = source.spec.frames, source.dataset.format != "jpeg"
    batches = iter(DALIGenericIterator(pipe, ["frames", "rows"], prepare_first_batch=False))
    for step in itertools.count():
        try:
            (out,) = next(batches)
        except StopIteration:
            raise
        except Exception as err:  # DALI re-raises worker and operator failures as bare Exception / RuntimeError
            # re-planning the batch here raises the SampleError (shard and key) of a damaged sample
            raise RuntimeError(_decode_failure(source, start + step * cfg.batch_size, cfg)) from err
        frames = out["frames"].to(cfg.device, non_blocking=True)
        frames = frames.reshape(-1, *frames.shape[-3:])
        rows = out["rows"] if video else out["rows"][::T]
        skipped = [int(r[4]) for r in rows.tolist() for _ in range(int(r[3]))]
        yield frames, rows.cpu(), skipped


def _decode_failure(source: ClipSource, first: int, cfg: DataConfig) -> str:
    """Name the samples of the batches DALI was decoding when it failed (it reports no sample)."""
    ahead = cfg.batch_size * (cfg.prefetch + 1)
    names = sorted({source.dataset.where(source.plan(p)[0].sample_id) for p in range(first, first + ahead)})
    return (f"DALI could not decode a sample of {source.dataset.path} (a JPEG with a valid header but "
            f"corrupt data; DALI cannot skip it). It is one of: {', '.join(names)}. Run once with "
            "DataConfig(backend='cpu'), which skips and names undecodable samples, and repack those sources")
