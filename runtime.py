"""Process-level settings that make small-tensor CPU work fast. Entry points
(cnf.py, bench.py) call ``configure`` once; library modules never do.

- glibc's malloc returns freed blocks of a few hundred KB to the OS and
  page-faults them back on the next allocation: with the solver's [n, w]
  temporaries that was ~500 page faults per field evaluation, more than the
  arithmetic itself. Raising the mmap and trim thresholds keeps them in the heap.
- Denormal floats (from s(1-s) products near saturation) are slow on x86;
  flushing them to zero changes nothing measurable in float32 training.
- Threads: torch's own default (OMP_NUM_THREADS when set, else one per core)
  unless the caller asks for a number. On a machine that other work keeps
  busy, fewer threads than cores avoids OpenMP threads waiting for a sibling
  that lost its core (see BENCHMARKS.md).
"""
import ctypes
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure(threads=None):
    """Apply the settings; ``threads`` (a positive int) sets torch's intra-op
    thread count, None keeps torch's default. Returns a short description for the log."""
    if threads is not None:
        torch.set_num_threads(threads)
    done = [f"{torch.get_num_threads()} thread(s)"]
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            if libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20):
                done.append("glibc malloc thresholds raised")
        except OSError:  # not glibc (e.g. musl): leave the allocator alone
            pass
    if torch.set_flush_denormal(True):
        done.append("denormals flushed")
    return ", ".join(done)
