"""Test-session setup for tests/.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors;
that mode is fixed when ``cnf_kernels`` is imported, so it is set here, before
any test module loads. Subprocesses (cnf.py smoke runs) inherit it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
