"""Runs before any test module is imported. Triton picks interpreter or compiled mode when a kernel is decorated
(at import of its module), so the mode is set here once rather than left to whichever test module happens to
import a kernel first. The suite's kernel tests run Triton on CPU tensors, which only the interpreter can do, on
any machine (with or without a GPU); the compiled GPU checks are a separate run that sets the mode itself:

    TRITON_INTERPRET=0 pytest tests/test_gpu_kernels.py tests/test_grouped_gemm.py::test_cuda_matches_ref_without_host_sync

(`bench/run_all.sh tests` on a GPU machine). In the default run they skip and say so."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Prepared data (train/data/prepare.py) goes to a shared cache, by default under ~/.cache; tests that do not name
# data.cache_dir use a temporary one instead.
import tempfile  # noqa: E402

os.environ.setdefault("DISTILL_DATA_CACHE", tempfile.mkdtemp(prefix="distill-test-data-"))
