"""Process-level settings that make small-tensor CPU work fast. Entry points
(cnf.py, bench.py) call ``configure`` once; library modules never do.

- glibc's malloc returns freed blocks of a few hundred KB to the OS and
  page-faults them back on the next allocation: with the solver's [n, w]
  temporaries that was ~500 page faults per field evaluation, more than the
  arithmetic itself. Raising the mmap and trim thresholds keeps them in the heap.
- Denormal floats (from s(1-s) products near saturation) are slow on x86;
  flushing them to zero changes nothing measurable in float32 training.
"""
import ctypes
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure():
    """Apply the settings; returns a short description for the log."""
    done = []
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            if libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20):
                done.append("glibc malloc thresholds raised")
        except OSError:  # not glibc (e.g. musl): leave the allocator alone
            pass
    if torch.set_flush_denormal(True):
        done.append("denormals flushed")
    return ", ".join(done) or "defaults"
