"""Shared contracts: the definitions several components must agree on, one file each.

This is the lowest layer of the package. Nothing here imports another dlightning module except
``dlightning.errors`` and ``dlightning.utils``; every other layer may import from here.

- :mod:`~dlightning.contracts.phases`: phase names, optimizer groups, LoRA families, loss terms.
- :mod:`~dlightning.contracts.config_io`: the one config loader and override grammar.
- :mod:`~dlightning.contracts.shard_format`: fields, manifest and decoding of a shard set.
- :mod:`~dlightning.contracts.checkpoint_format`: what a training checkpoint holds, and its reader.
- :mod:`~dlightning.contracts.export_format`: the merged export folder (writer and reader agree here).
"""
