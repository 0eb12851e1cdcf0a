"""Root pytest configuration. `.ci/test` runs the suite in two processes (pytest-xdist, `-n 2`): each worker computes
with one torch thread, since two workers of two threads each on a 2-core machine wait on each other's spinning threads
instead of computing."""
import torch


def pytest_configure(config):
    if hasattr(config, "workerinput"): torch.set_num_threads(1)   # an xdist worker; a plain run keeps torch's default
