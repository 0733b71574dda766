"""A set of named metrics built once and applied clip by clip (``dlightning evaluate``, validation).

Every weight file the chosen metrics need is checked before any network is built, so a missing file
stops the run at once with its key (:func:`~dlightning.metrics.weights.require_weight`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlightning.errors import ConfigError
from dlightning.metrics.flows import build_flow_net
from dlightning.metrics.registry import MetricSpec, metric_spec
from dlightning.metrics.video import psnr, ssim, warp_error
from dlightning.metrics.weights import MetricWeights, require_weight

_MIN_SIDE = {"niqe": 96, "ssim": 11, "ssim_y": 11}
"""Smallest frame side a metric works on (NIQE scores 96 x 96 blocks; SSIM has an 11-tap window)."""


def check_metric_weights(names: Sequence[str], weights: MetricWeights, key_prefix: str) -> list[MetricSpec]:
    """The specs of ``names``, after checking that every weight file they read exists.

    Raises:
        ConfigError: An unknown metric. MissingWeightsError: A file is unset or missing (key named).
    """
    specs = [metric_spec(n) for n in names]
    for spec in specs:
        for entry in spec.weights:
            require_weight(getattr(weights, entry), f"{key_prefix}.{entry}", entry)
    return specs


class MetricSuite:
    """Named metrics of output clips ``(T, 3, H, W)`` in [0, 1], optionally against GT clips.

    Args:
        names: Metric names of :data:`~dlightning.metrics.registry.METRICS`.
        weights: Local weight files.
        key_prefix: Config prefix of ``weights`` in error messages (e.g. ``evaluate.weights``).
        crop_border: Pixels removed from each side before the per-frame metrics.
        device: Where the networks run.
        lpips_net: LPIPS backbone (vgg | alex).
        raft_size: RAFT variant (large | small).
        batch_frames: Frames per network call.
    """

    def __init__(self, names: Sequence[str], weights: MetricWeights, *, key_prefix: str = "evaluate.weights",
                 crop_border: int = 0, device: str | torch.device = "cpu", lpips_net: str = "vgg",
                 raft_size: str = "large", batch_frames: int = 8) -> None:
        if not names:
            raise ConfigError("no metric chosen; list at least one, e.g. evaluate.metrics=[psnr,ssim]")
        if len(set(names)) != len(names):
            raise ConfigError(f"metrics {list(names)} name one twice; list each once")
        self.specs = check_metric_weights(names, weights, key_prefix)  # nothing is built while a file is missing
        self.names = list(names)
        self.crop_border, self.batch_frames = crop_border, batch_frames
        self.device = torch.device(device)
        self.nets: dict[str, nn.Module] = {}
        for spec in self.specs:
            net = self._build(spec.name, weights, key_prefix, lpips_net, raft_size)
            if net is not None:
                self.nets[spec.name] = net.to(self.device)

    @property
    def needs_gt(self) -> list[str]:
        """The chosen metrics that need GT frames."""
        return [s.name for s in self.specs if s.kind == "fr"]

    @staticmethod
    def _build(name: str, w: MetricWeights, prefix: str, lpips_net: str, raft_size: str) -> nn.Module | None:
        from dlightning.metrics import iqa

        if name.startswith("ewarp_"):
            flow = name.removeprefix("ewarp_")
            return build_flow_net(flow, getattr(w, flow, None), f"{prefix}.{flow}", raft_size)
        builders = {
            "lpips": lambda: iqa.build_lpips_scorer(w.lpips, f"{prefix}.lpips", lpips_net),
            "dists": lambda: iqa.build_dists(w.dists_vgg, f"{prefix}.dists_vgg", w.dists, f"{prefix}.dists"),
            "musiq": lambda: iqa.build_musiq(w.musiq, f"{prefix}.musiq"),
            "clipiqa": lambda: iqa.build_clipiqa(w.clipiqa, f"{prefix}.clipiqa"),
            "niqe": lambda: iqa.build_niqe(w.niqe, f"{prefix}.niqe"),
            "brisque": lambda: iqa.build_brisque(w.brisque, f"{prefix}.brisque"),
        }
        return builders[name]() if name in builders else None

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crop_border
        return x[..., c:-c, c:-c] if c else x

    def _per_frame(self, name: str, out: torch.Tensor, gt: torch.Tensor | None) -> float:
        """Mean over frames of a per-frame metric (frames sent in batches of ``batch_frames``)."""
        values = []
        for i in range(0, out.shape[0], self.batch_frames):
            o = self._crop(out[i:i + self.batch_frames]).to(self.device)
            g = None if gt is None else self._crop(gt[i:i + self.batch_frames]).to(self.device)
            if name in ("psnr", "psnr_y", "ssim", "ssim_y"):
                fn = psnr if name.startswith("psnr") else ssim
                values.append(fn(o, g, 0, y_channel=name.endswith("_y")).cpu())
            elif name in ("lpips", "dists"):
                values.append(self.nets[name](o, g).cpu())
            else:
                values.append(self.nets[name](o).cpu())
        return float(torch.cat(values).double().mean())

    @torch.no_grad()
    def score(self, output: torch.Tensor, gt: torch.Tensor | None = None) -> dict[str, float]:
        """Every chosen metric of one clip (per-frame metrics averaged over its frames).

        Args:
            output: The evaluated clip ``(T, 3, H, W)`` in [0, 1].
            gt: Its GT clip of the same shape, or None (then full-reference metrics are refused).

        Raises:
            ConfigError: A full-reference metric without GT, or clips of different shapes.
        """
        if gt is None and self.needs_gt:
            raise ConfigError(f"metrics {self.needs_gt} need GT frames; give the GT folder or drop them")
        if gt is not None and gt.shape != output.shape:
            raise ConfigError(f"output {tuple(output.shape)} and GT {tuple(gt.shape)} differ in frames or size")
        h, w = output.shape[-2] - 2 * self.crop_border, output.shape[-1] - 2 * self.crop_border
        for name, side in _MIN_SIDE.items():
            if name in self.names and min(h, w) < side:
                raise ConfigError(f"{name} needs frames of at least {side}x{side} px (after crop_border), got "
                                  f"{h}x{w}; drop it for such small clips")
        result: dict[str, float] = {}
        for spec in self.specs:
            if spec.kind == "temporal":
                net = self.nets[spec.name]
                dev = next(net.parameters(), torch.empty(0, device=self.device)).device
                value = warp_error(output.to(dev), net, None if gt is None else gt.to(dev))
                result[spec.name] = value
            else:
                result[spec.name] = self._per_frame(spec.name, output, gt)
        return result


def mean_over_clips(rows: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over clips; E*warp leaves out clips where it is undefined (NaN).

    Any other NaN (a broken output) stays in its mean, so it shows.
    """
    means = {}
    for name in names:
        vals = [r[name] for r in rows if name in r and not (name.startswith("ewarp") and math.isnan(r[name]))]
        means[name] = sum(vals) / len(vals) if vals else math.nan
    return means
