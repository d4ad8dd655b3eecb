"""Process memory figures for the benchmark: resident set size (now and peak), GPU memory.

RSS is process-wide: every model opened in the run shares it. Two figures make it per model:
the RSS growth while a model is opened (its weights, session and arenas), and the peak RSS
during that model's own timed slices. The peak is exact where Linux lets a process reset its
high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0); elsewhere only the peak of
the whole run (``getrusage``) is known and the per-slice peak is reported as None.
"""

from __future__ import annotations

import resource
import sys

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_MB = 1024.0 * 1024.0


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mib() -> float | None:
    """Current resident set size in MiB (None where /proc is absent)."""
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else None


def peak_rss_mib() -> float:
    """Peak RSS in MiB since start (or since the last :func:`reset_peak_rss`)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / _MB if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class GpuMemory:
    """torch's CUDA allocator peak (reset per slice) and the device's used memory, when CUDA is in use."""

    def __init__(self, enabled: bool):
        self.enabled = False
        if enabled:
            try:
                import torch

                self.enabled = torch.cuda.is_available()
            except ImportError:
                self.enabled = False

    def reset(self) -> None:
        if self.enabled:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_allocated_mib(self) -> float | None:
        if not self.enabled:
            return None
        import torch

        return torch.cuda.max_memory_allocated() / _MB

    def device_used_mib(self) -> float | None:
        """Memory in use on the device by every process and allocator (ONNX Runtime, TensorRT too)."""
        if not self.enabled:
            return None
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / _MB
