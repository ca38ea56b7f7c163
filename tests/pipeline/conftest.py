"""Pipeline fixtures; the data builders are in pipeline_data.py."""
from pathlib import Path

import pytest

from .pipeline_data import bogus_tables, corrupt_members, ramp_members, ramp_samples, truncated_header, write_dataset


@pytest.fixture(scope="session")
def ramp_shards(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("pipeline") / "ramp", ramp_samples())


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory) -> Path:
    """7 samples of 6 frames: ids 1 (bad_header_00000: truncated JPEGs) and 4 (bad_tables_00000:
    invalid Huffman tables) are corrupt."""
    samples = [(f"ok_v{i}_00000", ramp_members(6, 1), 6) for i in range(5)]
    samples.insert(1, ("bad_header_00000", corrupt_members(truncated_header), 6))
    samples.insert(4, ("bad_tables_00000", corrupt_members(bogus_tables), 6))
    return write_dataset(tmp_path_factory.mktemp("corrupt") / "ds", samples, shard_bytes=20_000)
