"""Shared test set-up."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; fail fast instead of waiting on one


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The test models are tiny: one intra-op thread is faster, and avoids thread thrashing on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
