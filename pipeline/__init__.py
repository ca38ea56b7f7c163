"""densevid data pipeline: packed shards -> decoded frames -> every objective's views, on the device.

    from pipeline import DataConfig, ViewSpec, build_loader
    loader = build_loader(DataConfig(path="data/kinetics"), ViewSpec(family="multicrop", frames=8, stride=4),
                          rank, world_size)
    for batch in loader: ...          # endless; loader.state_dict() / load_state_dict() resume exactly

DALI is imported only by `pipeline.dali`, when the DALI backend is used.
"""
from pipeline.config import DataConfig
from pipeline.loader import Loader, build_loader
from pipeline.views import ViewSpec

__all__ = ["DataConfig", "ViewSpec", "Loader", "build_loader"]
