"""Second-order Real-ESRGAN degradation of whole clips (docs/DATA.md 1.1, docs/METHOD.md 6.3).

Split so that a later online (on-GPU) degradation can reuse the recipes and the parameter
sampling without the OpenCV operators:

- :mod:`~dlightning.degradation.presets`: the typed recipes (``KernelSampling``, ``StagePreset``,
  ``CodecPreset``, ``DegradationPreset``), the named presets (``realesrgan``, ``dloral_mild``,
  ``video``), ``get_preset`` / ``preset_to_dict`` / ``recipe_overrides``. No OpenCV.
- :mod:`~dlightning.degradation.sampling`: ``sample_params`` and its helpers draw one clip's
  parameters from a recipe with an explicit generator (JSON-serialisable; kernels as specs). No OpenCV.
- :mod:`~dlightning.degradation.kernels`: blur-kernel specs and their construction (NumPy/SciPy).
- :mod:`~dlightning.degradation.operators`: blur, resize, noise (with the Poisson count tables),
  JPEG, USM sharpening and ``degrade_clip``, which applies drawn parameters to a clip (OpenCV).
- :mod:`~dlightning.degradation.codec`: video-codec compression of a clip as one sequence (PyAV).

This package imports nothing above the components layer (no ``dlightning.data`` or
``dlightning.shards``); this file imports none of its modules, so importing one stays cheap.
"""
