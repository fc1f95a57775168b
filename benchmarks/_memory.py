"""Peak memory of a run, measured one way for the benchmarks and the example.

CUDA: the caching allocator's peak above what was allocated at the start. CPU: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS at the
start, which sees every allocation, ours and the peers' alike; None where the kernel does
not allow the reset.
"""

import ctypes
import gc

import torch


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()
if LIBC is not None:
    # Big blocks through mmap, returned to the system on free: otherwise glibc keeps
    # freed memory mapped and reuses it, and the peak RSS of a later contender would
    # not show what it allocated. M_MMAP_THRESHOLD = -3.
    LIBC.mallopt(-3, 1 << 20)


def _status_mib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Peak:
    """`with Peak(device) as p: run(); p.read()` -> MiB added at the peak, or None."""

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.base = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        gc.collect()
        if LIBC is not None:
            LIBC.malloc_trim(0)  # freed blocks of earlier runs must not hide this one's peak
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return self
        self.base = _status_mib("VmRSS")
        return self

    def read(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        hwm = _status_mib("VmHWM")
        return None if self.base is None or hwm is None else max(0.0, hwm - self.base)

    def __exit__(self, *exc):
        return False
