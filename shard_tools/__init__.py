"""Shard tools: pack video collections into WebDataset shards with DALI indexes and a manifest.

Readers use `shard_tools.index.read_index` and `shard_tools.manifest.load_manifest`; the command
line tools are `shard_tools/pack.py`, `shard_tools/inspect.py`, `shard_tools/synth.py`.
"""
__version__ = "0.1.0"
