"""Root pytest configuration. `.ci/test` runs the suite in two processes (pytest-xdist, `-n 2`): each worker computes
with one torch thread, since two workers of two threads each on a 2-core machine wait on each other's spinning threads
instead of computing. The processes a worker starts (papermill kernels, servers, the CLI, a Kaggle image's venv) inherit
one thread through `OMP_NUM_THREADS`: alone, each would start one per core beside the other worker's."""
import os
import torch


def pytest_configure(config):
    if hasattr(config, "workerinput"):                # an xdist worker; a plain run keeps torch's default
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
