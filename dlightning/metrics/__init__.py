"""Quality metrics of upscaled frames and clips (docs/METRICS.md).

- :mod:`.video`: PSNR / SSIM (RGB or BT.601 Y), E*warp and :class:`VideoMetrics` of validation;
- :mod:`.flows`: the flow networks of E*warp (RAFT from torchvision, SPyNet, OpenCV Farneback);
- :mod:`.iqa`: LPIPS, DISTS and the no-reference metrics (MUSIQ, CLIP-IQA, NIQE, BRISQUE) through pyiqa,
  every weight read from a local file;
- :mod:`.registry`: the named metrics, their direction (higher or lower is better) and weight keys.
"""

from dlightning.metrics.video import VideoMetrics, flows_and_masks, psnr, rgb_to_y, ssim, warp_error

__all__ = ["VideoMetrics", "flows_and_masks", "psnr", "rgb_to_y", "ssim", "warp_error"]
