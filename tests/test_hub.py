"""``lit_peft.hub``: a model that cannot come from the hub fails in seconds with what to do, before any loading: a
local folder that does not exist (once reported as a malformed repo id), a folder that is not a saved model, a hub id
that is not cached while ``HF_HUB_OFFLINE`` is set or the hub is unreachable (once ~57 s of retries)."""

from __future__ import annotations

import time

import pytest

import lit_peft.hub as hub
from lit_peft.modules import CausalLMModule, ViTClassifier


def test_missing_local_folder_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.model_name_or_path: .*/no/such/model does not "
                                                r"exist \(a local model folder was expected.*lit_peft\.assets"):
        CausalLMModule(model_name_or_path=str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"the folder .*empty has no config\.json.*holds: notes\.txt"):
        CausalLMModule(model_name_or_path=str(tmp_path / "empty"))


def test_uncached_hub_model_offline_or_unreachable_fails_in_seconds(monkeypatch):
    monkeypatch.setattr(hub, "cached", lambda repo, filenames: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"'someone/some-model' is not in the local Hugging Face cache and "
                                      r"HF_HUB_OFFLINE is set"):
        CausalLMModule(model_name_or_path="someone/some-model")
    with pytest.raises(OSError, match=r"pretrained \(timm vit_tiny_patch16_224\).*HF_HUB_OFFLINE.*checkpoint_path"):
        ViTClassifier("vit_tiny_patch16_224", num_classes=2, pretrained=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # nothing listens there: refused at once
    with pytest.raises(OSError, match=r"cannot be reached from this machine.*HF_HUB_OFFLINE=1"):
        CausalLMModule(model_name_or_path="someone/some-model")
    assert time.perf_counter() - start < 15


def test_local_or_cached_sources_pass(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    hub.check_model_source(str(tmp_path / "model"), argument="x")
    monkeypatch.setattr(hub, "cached", lambda repo, filenames: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.check_model_source("someone/some-model", argument="x")
    assert hub.looks_local("./m") and hub.looks_local("/abs/m") and not hub.looks_local("org/name")
