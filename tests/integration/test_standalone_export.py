"""A merged export runs without dlightning: diffusers loads it and gives the frames `dlightning upscale` gives.

The standalone run is a subprocess in which importing ``dlightning`` fails (a ``sys.meta_path`` blocker, ``-I``,
a working directory outside the repository and a private diffusers module cache); it loads the export with
``DiffusionPipeline.from_pretrained(EXPORT, custom_pipeline=EXPORT, trust_remote_code=True)``.
"""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.media import randomized_generator, smooth_frames

from dlightning.cli import main
from dlightning.contracts import export_format
from dlightning.export import export_generator, standalone_source

TOL = 1e-4
"""Max difference in [0, 1] units between the standalone and the `dlightning upscale` frames (fp32 CPU)."""
# Settings that reach every branch on small frames: enlargement (16 px < 24), latent tiling (12x15 > 8^2),
# several window batches, the colour fix.
SETTINGS = {"min_short_side": 24, "tile_size": 8, "tile_overlap": 4, "batch_windows": 2, "color_fix": "wavelet"}

_DRIVER = textwrap.dedent('''
    import importlib.abc
    import sys


    class NoDlightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dlightning" or name.startswith("dlightning."):
                raise ImportError(f"{name} is blocked: an export must run without dlightning")
            return None


    sys.meta_path.insert(0, NoDlightning())
    try:
        import dlightning  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("dlightning is importable: the test would prove nothing")

    import json
    from pathlib import Path

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    export, frames_dir, out, settings = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
    pipe = DiffusionPipeline.from_pretrained(export, custom_pipeline=export, trust_remote_code=True)
    frames = [Image.open(p) for p in sorted(frames_dir.glob("*.png"))]
    result = np.stack(pipe(frames, output_type="np", **settings).frames)
    arrays = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    as_array = np.stack(pipe(arrays, output_type="np", **settings).frames)
    as_tensor = pipe(torch.from_numpy(arrays).permute(0, 3, 1, 2) / 255.0, output_type="pt", **settings).frames
    as_pil = pipe(frames, **settings).frames
    np.save(out / "frames.npy", result)
    report = {
        "pipeline_module": type(pipe).__module__,
        "cfr_module": type(pipe.cfr).__module__,
        "dlightning_loaded": any(m == "dlightning" or m.startswith("dlightning.") for m in sys.modules),
        "array_input_same": bool(np.array_equal(as_array, result)),
        "tensor_input_max": float((as_tensor - torch.from_numpy(result).permute(0, 3, 1, 2) / 255.0).abs().max()),
        "pil_sizes": sorted({im.size for im in as_pil}),
    }
    (out / "report.json").write_text(json.dumps(report))
''')


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return export_generator(copy.deepcopy(randomized_generator()), tmp_path_factory.mktemp("exp") / "model")


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lq") / "frames"
    folder.mkdir()
    for i, frame in enumerate(smooth_frames(5, 16, 20)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return folder


def _standalone(export: Path, frames: Path, work: Path) -> tuple[np.ndarray, dict]:
    """Run the export with diffusers in a process that cannot import dlightning."""
    import json

    work.mkdir()
    driver = work / "driver.py"
    driver.write_text(_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # One thread in both runs: the same kernels, and no OpenMP spinning against the other tests on a small machine.
    env.update(HF_MODULES_CACHE=str(work / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(driver), str(export), str(frames), str(work),
                           json.dumps(SETTINGS)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.load(work / "frames.npy"), json.loads((work / "report.json").read_text())


def _upscale_cli(export: Path, frames: Path, out: Path) -> np.ndarray:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the standalone run
    try:
        return _upscale_cli_run(export, frames, out)
    finally:
        torch.set_num_threads(threads)


def _upscale_cli_run(export: Path, frames: Path, out: Path) -> np.ndarray:
    argv = ["upscale", str(frames), "-o", str(out), "--model", str(export), "--device", "cpu", "--dtype", "fp32",
            "--min-short-side", "24", "--tile-size", "8", "--tile-overlap", "4", "--batch-windows", "2",
            "--color-fix", "wavelet"]
    assert main(argv) == 0
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(out.glob("*.png"))])


def test_diffusers_runs_the_export_without_dlightning_and_matches_upscale(export_dir, frames_dir, tmp_path):
    standalone, report = _standalone(export_dir, frames_dir, tmp_path / "standalone")
    assert report["pipeline_module"].startswith("diffusers_modules.") and not report["dlightning_loaded"]
    assert report["cfr_module"].startswith("diffusers_modules.")
    ours = _upscale_cli(export_dir, frames_dir, tmp_path / "upscaled")
    assert standalone.shape == ours.shape == (5, 64, 80, 3)
    diff = np.abs(standalone.astype(np.float64) - ours.astype(np.float64)) / 255.0
    assert diff.max() <= TOL, f"standalone vs dlightning upscale: max {diff.max():.3g}"
    # The other input and output types give the same frames.
    assert report["array_input_same"] and report["tensor_input_max"] <= TOL and report["pil_sizes"] == [[80, 64]]


def test_every_module_copy_equals_the_package_module(export_dir):
    copies = {name: export_dir / name for name in export_format.PIPELINE_MODULES}
    copies[export_format.CFR_MODULE] = export_dir / export_format.CFR_DIR / export_format.CFR_MODULE
    for name, copied in copies.items():
        assert copied.read_bytes() == standalone_source(name).read_bytes(), f"{copied} differs from the package"


ALLOWED_IMPORTS = {"torch", "numpy", "diffusers", "transformers", "safetensors", "PIL"}


def test_standalone_modules_import_only_what_an_export_may_need():
    """No dlightning import (diffusers tries every import line of an export's code), only these libraries."""
    folder = standalone_source("__init__.py").parent
    names = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
    assert set(names) == {*export_format.PIPELINE_MODULES, export_format.CFR_MODULE}
    for name in names:
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = {(node.module or "").split(".")[0]}
            else:
                continue
            bad = {t for t in tops if t not in ALLOWED_IMPORTS and t not in sys.stdlib_module_names}
            assert not bad, f"{name}:{node.lineno} imports {bad}"
    # pipeline.py imports every sibling it needs itself: diffusers copies only its direct relative imports.
    pipeline = (folder / "pipeline.py").read_text()
    for sibling in export_format.PIPELINE_MODULES[1:]:
        assert f"from .{sibling.removesuffix('.py')} import" in pipeline


def test_model_index_names_the_pipeline_and_the_cfr_component(export_dir):
    import json

    index = json.loads((export_dir / export_format.MODEL_INDEX_FILE).read_text())
    assert index["_class_name"] == ["pipeline", export_format.PIPELINE_CLASS]
    assert index["cfr"] == ["dloral_cfr", export_format.CFR_CLASS]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["scale"] == 4
    assert (export_dir / "cfr" / "config.json").is_file()
    assert (export_dir / "cfr" / "diffusion_pytorch_model.safetensors").is_file()
