"""Kernel tests. Without CUDA the Triton kernels run under Triton's interpreter, switched on here before any test imports
the kernels' Triton modules (a test-only setting); with CUDA they run compiled on the GPU."""
import os
import pytest, torch

if not torch.cuda.is_available(): os.environ["TRITON_INTERPRET"] = "1"

@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

@pytest.fixture(scope="session")
def triton_impl(device):
    "`triton_impl(name)`: the Triton version of kernel `name`, or a skip saying why it cannot run here."
    from specdec_kernels.triton_support import triton_unavailable, triton_module
    def get(name):
        if (why := triton_unavailable(device)) is not None: pytest.skip(f"Triton comparison skipped: {why}")
        return getattr(triton_module(name), f"{name}_triton")
    return get
