"""Runs before any test module is imported. Without a CUDA device, Triton kernels can only run in the
interpreter, and Triton picks interpreter or compiled mode when a kernel is decorated (at import of its
module), so the mode is set here once rather than left to whichever test module happens to import a kernel
first. On a GPU machine nothing is set: tests/test_gpu_kernels.py wants compiled kernels
(`TRITON_INTERPRET=0 pytest tests/test_gpu_kernels.py`)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
