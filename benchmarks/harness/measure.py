"""Device-aware synchronisation and peak memory of one call."""

from __future__ import annotations

from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so timers see the kernels' real end."""

    def run():
        result = fn()
        synchronize(device)
        return result

    return run


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated by ``fn`` at its peak, beyond what was allocated before the call.

    CUDA: the caching allocator's peak statistic.  CPU: the profiler's allocation events,
    replayed in time order (it sees every tensor allocation, transient ones inside ops too).
    Returns ``None`` when the profiler cannot report allocations.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocations = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    except (ImportError, AttributeError, RuntimeError):  # private profiler API changed
        return None
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak
