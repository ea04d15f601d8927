"""Shared test set-up, and the fixtures used by more than one test file.

Helper functions and constants live in the ``helpers`` package beside this file (importable as ``helpers.*``
because pytest puts this folder on ``sys.path``). ``callbacks/conftest.py`` overrides ``images`` for the callback
tests.
"""

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; fail fast instead of waiting on one
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from helpers.callbacks import IMG_SIZE, LightningLogRecords  # noqa: E402
from helpers.cli import make_vtab_task  # noqa: E402
from helpers.data import make_color_vtab_task, make_tokenizer  # noqa: E402
from helpers.distributed import RECORDER  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The test models are tiny: one intra-op thread is faster, and avoids thread thrashing on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- Hugging Face and peft -----------------------------------------------------------------------------------------
@pytest.fixture
def hf_offline(monkeypatch):
    """No hub access for ``transformers`` and ``huggingface_hub`` (``pytest.mark.usefixtures("hf_offline")``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def peft_boft_on_cpu(monkeypatch):
    """peft's multi-factor BOFT needs its CUDA extension; give it the CPU stand-in :class:`CpuFastBlockDiag` (and no
    compile attempt), so that peft's real butterfly path runs."""
    import peft.tuners.boft.layer as peft_boft_layer

    from helpers.peft_cpu import CpuFastBlockDiag

    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: CpuFastBlockDiag)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama pre-trained for a few steps on the arithmetic data, with its tokenizer, in a local folder; and
    the train / GSM-8K-style eval jsonl files beside it (:func:`helpers.language.build_tiny_llama`)."""
    from helpers.language import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


# -- images and vision data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    """Two random 32×32 RGB images (the adapter tests' input to ``make_vit``'s ViT)."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def digits():
    """One data module for every fit (its setup is cheap, but loading sklearn's digits once is cheaper)."""
    from lit_peft.data import DigitsDataModule

    return DigitsDataModule(img_size=IMG_SIZE, batch_size=32)


@pytest.fixture
def lightning_log():
    """What Lightning's ``rank_zero_info`` logs during the test (:class:`LightningLogRecords`)."""
    handler = LightningLogRecords()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture()
def vtab_root(tmp_path: Path) -> Path:
    """A data root holding the solid-colour ``dmlab`` task folder of :func:`helpers.data.make_color_vtab_task`."""
    make_color_vtab_task(tmp_path)
    return tmp_path


# -- text data -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """The tiny byte-level BPE tokenizer of :func:`helpers.data.make_tokenizer`, saved in a folder."""
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# -- distributed CLI runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vtab_workdir(tmp_path_factory):
    """``(folder, data root)``: a folder with the step recorder (``recorder.py``) for the CLI runs of
    :func:`helpers.distributed.fit`, and the generated VTAB task."""
    tmp = tmp_path_factory.mktemp("distributed")
    (tmp / "recorder.py").write_text(RECORDER)
    return tmp, make_vtab_task(tmp / "vtab", sizes=(("train800", 16), ("val200", 6), ("test", 8)))
