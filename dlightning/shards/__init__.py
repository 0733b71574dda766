"""The offline shard builder: source clips -> degraded HR/LQ clips -> WebDataset shards + manifest.

- :mod:`~dlightning.shards.config`: the typed build config (``DataPrepConfig``) and its loader.
- :mod:`~dlightning.shards.sources`: clip enumeration (frame folders, videos, images, demo photos) and loading.
- :mod:`~dlightning.media`: image reading and video probing, shared with inference (a layer up).
- :mod:`~dlightning.shards.camera_path`: camera-path pseudo-videos rendered from one image.
- :mod:`~dlightning.shards.captions`: per-clip captions (none, a captions file, or a local model).
- :mod:`~dlightning.shards.writer`: one shard's samples (load, degrade, caption, encode) and its atomic tar.
- :mod:`~dlightning.shards.manifest`: writing the manifest, done records for resume, verification.
- :mod:`~dlightning.shards.build`: ``build_shards``, ``verify_shards``, ``build_demo_shards``.

Image reading and video probing are :mod:`dlightning.media`, shared with inference.
The shard format itself (fields, manifest, decoding) is :mod:`dlightning.contracts.shard_format`,
shared with the training loader; this package and ``dlightning.data`` never import each other.
"""
