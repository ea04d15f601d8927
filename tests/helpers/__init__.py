"""Helper functions and constants the test files share (the fixtures built from them are in ``tests/conftest.py``).

``tests/`` is on ``sys.path`` under pytest (its ``conftest.py`` puts it there), so test files import these as
``from helpers.models import make_vit``:

* ``models``: the tiny timm ViT of the adapter tests, the tiny ``ViTClassifier``, a stack of linears, random adapter
  values;
* ``adapters``: snapshots, the "nothing was modified" check, the parameter-count formulas, stand-in ViT module trees;
* ``callbacks``: the callback tests' ``ViTClassifier`` (width 64) and short Trainer runs;
* ``cli``: ``python -m lit_peft`` subprocesses, generated VTAB data and fit configs, ``--print_config`` in-process;
* ``distributed``: spawned gloo workers, the CLI runs single process vs DDP vs FSDP2;
* ``data``: generated images, VTAB folders and a tiny trained tokenizer for the data-module tests;
* ``language``: the tiny Llama with its tokenizer and arithmetic data, helpers for ``transformers`` models;
* ``reference``: dense float64 reference formulas of every adapter method;
* ``peft_cpu``: a CPU stand-in for ``peft``'s BOFT CUDA extension.
"""
