"""Peak memory of a run, measured one way for the benchmarks and the example, and the one
allocator policy every benchmark times under.

CUDA: the caching allocator's peak above what was allocated at the start. CPU: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS at the
start, which sees every allocation, ours and the peers' alike; None where the kernel does
not allow the reset.

Allocator (glibc): timed calls (`timed(fn)`, _util.interleaved) run with freed blocks
kept in the heap and reused, as a user's process does (glibc's dynamic mmap threshold rises
to the sizes a program frees, trim = 2x threshold); fixed here so that it does not depend on
what ran before, and raised above glibc's 32 MiB ceiling so that big outputs do not pay fresh
page faults on every call (every contender alike). Everything else, the inputs and the
memory measurements included, runs with blocks >= 1 MiB mapped and unmapped, so the peak
shows what the measured call allocated. Timed calls run on a thread of their own, with its
own glibc arena: glibc serves big requests from free heap chunks that timed calls left
(malloc_trim drops their pages, not the chunks), and such a block freed mid-call stays
resident under the call's later mmaps (fp32 flash N=4096 causal forward+backward measured
8 MiB more that way).
"""

import concurrent.futures

import ctypes
import gc

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
POLICIES = {  # name -> (mmap threshold, trim threshold) of the timed calls
    "keep": (1 << 30, 1 << 31),  # freed blocks up to 1 GiB stay in the heap
    "glibc": (32 << 20, 64 << 20),  # glibc's dynamic mode at its ceiling
}
# outside the timed calls: blocks >= 1 MiB mapped and unmapped, the heap trimmed at
# glibc's default 128 KiB
MEASURE_MMAP_THRESHOLD, MEASURE_TRIM_THRESHOLD = 1 << 20, 128 << 10


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()
_policy = None


def _thresholds(mmap, trim):
    LIBC.mallopt(M_MMAP_THRESHOLD, mmap)
    LIBC.mallopt(M_TRIM_THRESHOLD, trim)


def set_policy(name="keep"):
    """Chooses allocator policy `name` (POLICIES) for the timed calls; returns whether
    mallopt is available."""
    global _policy
    if LIBC is None or not hasattr(LIBC, "mallopt"):
        return False
    POLICIES[name]  # noqa: B018  (an unknown name raises here)
    _policy = name
    _thresholds(MEASURE_MMAP_THRESHOLD, MEASURE_TRIM_THRESHOLD)
    return True


# one thread for every timed call: glibc gives it an arena of its own, so the blocks the
# timed calls leave free never serve a measured call (Peak runs on the calling thread)
_TIMER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-timing")


def timed(fn):
    """fn() on the timing thread (under the caller's grad mode, which is per thread) and the
    timed calls' allocator policy; the measuring policy after, our kernels' pooled scratch
    released."""
    if _policy is None:
        return fn()
    grad = torch.is_grad_enabled()

    def run():
        with torch.set_grad_enabled(grad):
            return fn()

    _thresholds(*POLICIES[_policy])
    try:
        return _TIMER.submit(run).result()
    finally:
        _thresholds(MEASURE_MMAP_THRESHOLD, MEASURE_TRIM_THRESHOLD)
        _release_workspace()


def policy_line():
    """The allocator policy in words, for the benchmark headers."""
    if _policy is None:
        return "allocator: glibc defaults (mallopt unavailable)"
    mmap, trim = POLICIES[_policy]
    return (f"allocator: timed calls `{_policy}` (glibc mmap threshold {mmap >> 20} MiB, trim {trim >> 20} MiB), "
            f"inputs and memory measurements mmap threshold {MEASURE_MMAP_THRESHOLD >> 20} MiB, trim "
            f"{MEASURE_TRIM_THRESHOLD >> 10} KiB")


set_policy()


def _release_workspace():
    """Our kernels' pooled scratch goes back first, so that the measured call allocates it."""
    try:
        from attention_ext import _isa
    except ImportError:
        return
    _isa.release_workspace()


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
        _release_workspace()
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
