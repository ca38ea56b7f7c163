"""densevid data pipeline: packed shards -> decoded frames -> every objective's views, on the device.

    from pipeline import DataConfig, MulticropViews, build_loader
    loader = build_loader(DataConfig(path="data/kinetics"), MulticropViews(frames=8, stride=4), rank, world_size)
    for batch in loader: ...          # endless; loader.state_dict() / load_state_dict() resume exactly

DALI is imported only by `pipeline.dali`, when the DALI backend is used.
"""
from pipeline.config import DataConfig

VIEW_SPECS = ("ViewSpec", "ClipViews", "MulticropViews", "GridViews")
__all__ = ["DataConfig", *VIEW_SPECS, "Loader", "build_loader"]


def __getattr__(name: str):
    """The torch-backed names are imported on first use: `import pipeline` (and `DataConfig`) stay
    cheap for command lines that are checked before torch is imported."""
    if name in ("Loader", "build_loader"):
        from pipeline import loader

        return getattr(loader, name)
    if name in VIEW_SPECS:
        from pipeline import views

        return getattr(views, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
