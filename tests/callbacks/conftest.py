"""The callback tests run on four images (``tests/conftest.py``'s ``images``, for the adapter tests, has two)."""

import pytest
import torch

from helpers.callbacks import IMG_SIZE


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(1234))
