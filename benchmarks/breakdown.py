"""Per-component breakdown of a training step or an inference call: seconds, share and FLOPs.

The components are regions of the project's own call graph (VAE encode, CFR and its flow, UNet,
VAE decode, LPIPS, temporal loss, CSD teacher, optimizer, ...). :func:`regions` marks them by
wrapping the bound methods of one module instance for the duration of a ``with`` block, so the
production code carries no profiling hooks.

* **Time** comes from ``torch.profiler``: every op's self CPU (and, on CUDA, device) time is charged
  to the innermost region around it. A backward op has no region around it; it is charged to the
  region of the forward op that created its autograd node, which the profiler links through the
  node's sequence number.
* **FLOPs** come from ``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention),
  applied by a dispatch mode that knows the current region; in backward the region is read from
  the autograd node being run (stored on each node at creation by ``node_creation_hook``).

Nothing here is written by hand where torch offers it, except the attribution itself: torch's
profiler groups by op name or module, not by a caller-defined region that spans forward and backward.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PREFIX = "dl::"
"""Name prefix of the profiler ranges that mark regions."""

_state = threading.local()


def _stack() -> list[str]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


@contextmanager
def region(name: str) -> Iterator[None]:
    """Mark the code inside as region ``name`` (nested regions join with ``/``)."""
    stack = _stack()
    stack.append(name)
    try:
        with torch.profiler.record_function(PREFIX + "/".join(stack)):
            yield
    finally:
        stack.pop()


def _wrap(obj: Any, attr: str, name: str) -> Callable[[], None]:
    """Replace ``obj.attr`` (a bound method) by one that runs inside ``region(name)``; returns the undo."""
    original = getattr(obj, attr)
    had_own = attr in vars(obj)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with region(name):
            return original(*args, **kwargs)

    setattr(obj, attr, wrapped)

    def undo() -> None:
        if had_own:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)

    return undo


@contextmanager
def regions(targets: list[tuple[Any, str, str]]) -> Iterator[None]:
    """Mark each ``(object, method name, region name)`` as a region while the block runs.

    Objects that are None are skipped (e.g. a temporal loss that is switched off).
    """
    undos = [_wrap(obj, attr, name) for obj, attr, name in targets if obj is not None]
    try:
        yield
    finally:
        for undo in reversed(undos):
            undo()


def training_regions(module: Any) -> list[tuple[Any, str, str]]:
    """The regions of a ``DLoRALModule`` step (generator parts and loss terms)."""
    gen, loss = module.generator, module.loss
    return [
        (gen, "encode_prompts", "text encoder"),
        (gen, "upsample_lq", "LQ upsample"),
        (gen, "encode_latents", "VAE encode"),
        (gen.cfr, "compute_flow", "CFR flow"),
        (gen.cfr, "forward", "CFR"),
        (gen.unet, "forward", "UNet"),
        (gen, "decode_latents", "VAE decode"),
        (loss.lpips, "forward", "LPIPS"),
        (loss, "_temporal", "temporal loss"),
        (loss, "_csd", "CSD"),
    ]


def component(path: str) -> str:
    """The reported component of a region path: the innermost region, with the CSD teacher apart."""
    parts = path.split("/")
    if "CSD" in parts and parts[-1] != "CSD":
        return "CSD teacher (" + parts[-1] + ")"
    return parts[-1]


@dataclass
class Breakdown:
    """Seconds and FLOPs per ``(component, pass)``, ``pass`` being ``forward`` or ``backward``."""

    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    flops: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    wall: float = 0.0
    calls: int = 1

    def rows(self) -> list[list[Any]]:
        """Table rows ``[component, pass, s per call, share %, GFLOP per call]``, largest first."""
        keys = set(self.seconds) | set(self.flops)
        total = sum(self.seconds.values()) or 1.0
        rows = [[c, p, self.seconds.get((c, p), 0.0) / self.calls,
                 100.0 * self.seconds.get((c, p), 0.0) / total, self.flops.get((c, p), 0) / 1e9 / self.calls]
                for c, p in keys]
        return sorted(rows, key=lambda r: -r[2])

    def share(self, name: str) -> float:
        """Share (0-1) of the profiled time spent in component ``name`` (both passes)."""
        total = sum(self.seconds.values()) or 1.0
        return sum(v for (c, _), v in self.seconds.items() if c == name) / total


class _RegionFlops(TorchDispatchMode):
    """Counts FLOPs per region with torch's own formulas (``torch.utils.flop_counter.flop_registry``)."""

    def __init__(self, out: Breakdown) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.out = flop_registry, out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            node = torch._C._current_autograd_node()
            if node is not None:
                key = (component(node.metadata.get("dl_region", "other")), "backward")
            else:
                key = (component("/".join(_stack()) or "other"), "forward")
            self.out.flops[key] += int(formula(*args, **kwargs, out_val=result))
        return result


def _tag_node(node: torch.autograd.graph.Node) -> None:
    """Store the forward region on each new autograd node (recomputation inherits its caller's)."""
    path = "/".join(_stack())
    if not path:
        current = torch._C._current_autograd_node()
        path = current.metadata.get("dl_region", "") if current is not None else ""
    node.metadata["dl_region"] = path or "other"


def _innermost_region(event: Any) -> str | None:
    while event is not None:
        if event.name.startswith(PREFIX):
            return event.name[len(PREFIX):]
        event = event.cpu_parent
    return None


def _backward_root(event: Any) -> Any:
    while event is not None:
        if event.name.startswith("autograd::engine::evaluate_function"):
            return event
        event = event.cpu_parent
    return None


def _charge_times(events: list[Any], out: Breakdown) -> None:
    """Charge every op's self time to its region (forward) or its node's forward region (backward)."""
    seq_region: dict[tuple[int, int], str] = {}
    for ev in events:
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::") and (ev.thread, ev.sequence_nr) \
                not in seq_region and _backward_root(ev) is None:
            seq_region[ev.thread, ev.sequence_nr] = _innermost_region(ev) or "other"
    for ev in events:
        if ev.name.startswith(PREFIX):
            continue
        seconds = (ev.self_cpu_time_total + getattr(ev, "self_device_time_total", 0.0)) / 1e6
        root = _backward_root(ev)
        if root is None:
            out.seconds[component(_innermost_region(ev) or "other"), "forward"] += seconds
        else:
            path = seq_region.get((root.fwd_thread, root.sequence_nr), "other")
            out.seconds[component(path), "backward"] += seconds


def profile_call(fn: Callable[[], Any], *, targets: list[tuple[Any, str, str]], calls: int = 1,
                 device: torch.device | None = None) -> Breakdown:
    """Run ``fn`` ``calls`` times under the profiler and the FLOP counter; return its breakdown.

    The FLOP count runs once, separately, so that its dispatch overhead is not in the timings.
    """
    out = Breakdown(calls=calls)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device is not None and device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with regions(targets):
        flops = Breakdown()
        with torch.autograd.graph.node_creation_hook(_tag_node), _RegionFlops(flops):
            fn()
        out.flops = defaultdict(int, {k: v * calls for k, v in flops.flops.items()})
        with ExitStack() as stack:
            prof = stack.enter_context(torch.profiler.profile(activities=activities))
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            out.wall = (time.perf_counter() - start) / calls
        _charge_times(list(prof.events()), out)
    return out


def breakdown_table(bd: Breakdown, title: str) -> str:
    """A markdown table of one breakdown (component, pass, seconds, share, GFLOP)."""
    lines = [f"**{title}** (profiled wall {bd.wall:.3f} s per call; profiler time charged per component)", "",
             "| component | pass | s per call | share % | GFLOP |", "|---|---|---|---|---|"]
    for comp, pas, sec, share, gflop in bd.rows():
        lines.append(f"| {comp} | {pas} | {sec:.4f} | {share:.1f} | {gflop:.2f} |")
    return "\n".join(lines) + "\n"
