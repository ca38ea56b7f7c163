"""Shard tools: pack video collections into WebDataset shards with DALI indexes and a manifest.

Readers use `shard_tools.index.read_index` and `shard_tools.manifest.load_manifest`; the command
line tools are `shard_tools/pack.py`, `shard_tools/inspect.py`, `shard_tools/synth.py` and
`shard_tools/datasets.py` (get DAVIS-2017, check downloaded YouTube-VOS / Kinetics / Walking Tours folders).
"""
__version__ = "0.1.0"
