"""Standalone-safe modules: the inference code every export carries with it.

Each module here imports only torch, numpy, diffusers, transformers and safetensors (and its siblings,
relatively), never ``dlightning``. ``dlightning export`` copies them byte for byte into the export folder,
where diffusers runs them as a custom pipeline (``pipeline.py``, ``dloral_onestep.py``,
``dloral_frames.py`` next to ``model_index.json``) and a custom component (``cfr/dloral_cfr.py``) without
dlightning installed. The package runs the same modules itself: training (CFR, the one-step forward
pieces) and ``dlightning upscale`` (the window runner), so an export computes what dlightning computes.

Rules for editing them: no ``dlightning`` import (not even inside a function: diffusers checks every
``import`` line), and ``pipeline.py`` imports every sibling it needs directly, because diffusers copies only
the modules that ``pipeline.py`` itself imports relatively.
"""
