"""Answer extraction and scoring for the LLM evaluations (protocols: docs/protocols.md, sections LLMs: math and
LLMs: commonsense).

* **GSM-8K** (MetaMathQA → GSM-8K): the prediction is the *last* number in the model output, the gold is the
  number after ``####``; the two are compared as numbers (tolerance 1e-4), as MetaMath's evaluation does.
* **MATH** (MetaMathQA → MATH): the prediction is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``,
  or ``\\boxed 5``), falling back to MetaMath's ``The answer is: X``; prediction and gold are compared as strings
  after the normalisation of Hendrycks et al.'s MATH evaluation (``strip_string``), re-implemented here.
* **Commonsense-15K** (LLM-Adapters, Hu et al. 2023): the model answers with a word of the task's answer
  vocabulary (``true``/``false``, ``solution1``/``solution2``, ``option1``/``option2``, ``answerN``,
  ``endingN``); the prediction is the first such word in the output.

The extraction functions are plain Python (``re`` and ``decimal``); :class:`AnswerAccuracy` is a torchmetrics
metric that sums its counts across processes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import torch
from torchmetrics import Metric

# --------------------------------------------------------------------------------------------------- GSM-8K

#: Absolute tolerance of :func:`numbers_equal`.
NUMBER_TOLERANCE = 1e-4

# A number: optional minus sign, optional dollar sign, then "1,234,567(.89)", "1234(.5)" or ".5". The look-behind
# keeps the pattern from starting inside a word or another number ("x2", the "3" of "1.3"), and makes a hyphen
# between two numbers ("10-12") a range, not a minus sign. A trailing period ("42.") is not part of the number
# because a decimal point needs a digit after it. A following "%" is simply ignored.
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>-)?\$?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)


def _normalise_number(number: str) -> str:
    """Canonical string of a decimal number: no commas, no trailing zeros, no "-0" ("3.50" → "3.5", "-0" → "0")."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"not a number: {number!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a finite number: {number!r}")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The last number in a model output, normalised ("$1,234.50." → "1234.5", "-3" → "-3"); None if none."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is None:
        return None
    return _normalise_number((last.group("sign") or "") + last.group("num"))


def gsm8k_gold(answer_field: str) -> str:
    """The gold number of a GSM-8K ``answer`` field: the number after the (last) ``####``, normalised."""
    if "####" not in answer_field:
        raise ValueError(f"GSM-8K answer has no '####' gold marker: {_preview(answer_field)}")
    tail = answer_field.rsplit("####", 1)[1]
    match = _NUMBER_RE.search(tail.strip())
    if match is None:
        raise ValueError(f"GSM-8K answer has no number after '####': {_preview(answer_field)}")
    return _normalise_number((match.group("sign") or "") + match.group("num"))


def numbers_equal(a: str | float | int | None, b: str | float | int | None) -> bool:
    """Whether two numbers (strings like "1,234" or numbers) agree within 1e-4; False if either is None or not
    a number."""
    if a is None or b is None:
        return False
    try:
        x = float(str(a).replace(",", "").strip())
        y = float(str(b).replace(",", "").strip())
    except ValueError:
        return False
    return abs(x - y) <= NUMBER_TOLERANCE


# ----------------------------------------------------------------------------------------------------- MATH

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS_RE = re.compile(r"the answer is\s*:?", re.IGNORECASE)


def _last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed``/``\\fbox`` in ``text``; None if there is none or its braces don't close."""
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command):]
    body = rest.lstrip()
    if body.startswith("{"):
        depth = 0
        for i, char in enumerate(body):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return body[1:i].strip()
        return None  # unbalanced
    if rest[:1].isspace():  # "\boxed 5": the box holds the next token
        token = re.match(r"[^\s$]+", body)
        if token is not None:
            return token.group(0).rstrip(".,")
    return None


def _answer_is_fallback(text: str) -> str | None:
    """MetaMath's answer format: what follows the last "The answer is:" up to the end of that line, without a
    trailing period or enclosing ``$``."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end():].split("\n", 1)[0].strip()
    answer = answer.rstrip(".").strip().strip("$").strip()
    return answer or None


def extract_math_answer(text: str) -> str | None:
    """The (unnormalised) answer of a MATH solution: the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X``,
    else MetaMath's "The answer is: X" (also when the last box is unbalanced or empty), else None."""
    boxed = _last_boxed_content(text)
    if boxed:  # an empty \boxed{} counts as no answer
        return boxed
    return _answer_is_fallback(text)


def _fix_fracs(s: str) -> str:
    r"""Brace the arguments of ``\frac`` written without braces: ``\frac12`` → ``\frac{1}{2}``,
    ``\frac1b`` → ``\frac{1}{b}``, ``\frac1{72}`` → ``\frac{1}{72}``. A ``\frac`` with fewer than two characters
    after it leaves the string unchanged."""
    head, *pieces = s.split("\\frac")
    out = [head]
    for piece in pieces:
        out.append("\\frac")
        if piece.startswith("{"):
            out.append(piece)
            continue
        if len(piece) < 2:
            return s
        numerator, second, tail = piece[0], piece[1], piece[2:]
        if second == "{":
            out.append("{" + numerator + "}" + second + tail)
        else:
            out.append("{" + numerator + "}{" + second + "}" + tail)
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    r"""``a/b`` with two plain integers → ``\frac{a}{b}``; anything else unchanged."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":  # only the canonical spelling ("1/2", not "01/2" or " 1/2")
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    r"""Drop a unit written as ``\text{ unit}`` (with the space) and everything after it."""
    if "\\text{ " in s:
        return s.split("\\text{ ", 1)[0]
    return s


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt3`` → ``\sqrt{3}`` (one character); braced arguments unchanged."""
    head, *pieces = s.split("\\sqrt")
    out = [head]
    for piece in pieces:
        if piece and piece[0] != "{":
            out.append("\\sqrt{" + piece[0] + "}" + piece[1:])
        else:
            out.append("\\sqrt" + piece)
    return "".join(out)


def normalize_math_answer(s: str) -> str:
    r"""Normalise a MATH answer string, following Hendrycks et al.'s ``strip_string`` step by step:

    drop line breaks and ``\!``; ``\\`` → ``\``; ``tfrac``/``dfrac`` → ``frac``; drop ``\left``/``\right``,
    degrees (``^{\circ}``, ``^\circ``), ``\$``, a right unit ``\text{ ...}`` and ``\%``; make decimals start with
    a zero (" ." → " 0.", "{." → "{0.", leading "." → "0."); drop a short left-hand side ``k = `` (at most two
    characters before a single "="); ``\sqrt3`` → ``\sqrt{3}``; remove spaces; ``\frac12`` → ``\frac{1}{2}``;
    the exact string "0.5" → ``\frac{1}{2}``; integer ``a/b`` → ``\frac{a}{b}``.

    One addition (from MetaMath's answer extraction, applied to both sides): surrounding whitespace and a
    trailing period are removed first. The normalisation is otherwise literal, so e.g. "0.50" stays "0.50"
    (only "0.5" and ".5" become ``\frac{1}{2}``) and a bare "%" is kept.
    """
    s = s.strip()
    if s.endswith("."):
        s = s[:-1]
    s = s.replace("\n", "")
    s = s.replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    return s


def math_answers_equal(pred: str | None, gold: str) -> bool:
    """Whether two MATH answers are equal after :func:`normalize_math_answer`; a missing prediction is wrong."""
    if pred is None:
        return False
    return normalize_math_answer(pred) == normalize_math_answer(gold)


# ---------------------------------------------------------------------------------------------- Commonsense

#: The commonsense tasks (LLM-Adapters dataset names) and their answer vocabularies.
COMMONSENSE_TASKS: dict[str, list[str]] = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": ["answer1", "answer2", "answer3"],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
    "ARC-Challenge": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "ARC-Easy": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "openbookqa": ["answer1", "answer2", "answer3", "answer4", "answer5"],
}

#: Classification tasks answered with a word (instruction-style), scored like the commonsense tasks.
CLASSIFICATION_TASKS: dict[str, list[str]] = {"sentiment": ["positive", "negative"]}

#: Every task answered by a word of its vocabulary (the first such word of the generation is the answer).
WORD_TASKS: dict[str, list[str]] = {**COMMONSENSE_TASKS, **CLASSIFICATION_TASKS}

#: Every task :func:`extract_answer` / :func:`is_correct` accept (canonical names).
TASKS: tuple[str, ...] = ("gsm8k", "math", *WORD_TASKS)

# Common other spellings of the task names (matched case-insensitively, like the canonical names).
_ALIASES = {
    "gsm-8k": "gsm8k", "gsm_8k": "gsm8k", "hendrycks_math": "math",
    "siqa": "social_i_qa", "social_iqa": "social_i_qa",
    "arc-c": "ARC-Challenge", "arc_c": "ARC-Challenge", "arc_challenge": "ARC-Challenge",
    "arc-e": "ARC-Easy", "arc_e": "ARC-Easy", "arc_easy": "ARC-Easy",
    "obqa": "openbookqa",
}
_BY_LOWER = {name.lower(): name for name in TASKS} | _ALIASES

_WORD_RE = {
    task: re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    for task, words in WORD_TASKS.items()
}


def canonical_task(task: str) -> str:
    """The canonical name of a task ("ARC-Easy" for "arc_e", "social_i_qa" for "SIQA", ...); ValueError listing
    the valid tasks if unknown."""
    name = _BY_LOWER.get(task.strip().lower())
    if name is None:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return name


def _word_task(task: str) -> str:
    name = canonical_task(task)
    if name not in WORD_TASKS:
        raise ValueError(f"{task!r} is not a commonsense task nor another task answered by a word; valid tasks: "
                         f"{', '.join(WORD_TASKS)}")
    return name


def extract_commonsense_answer(task: str, text: str) -> str | None:
    """The first word of the task's answer vocabulary in ``text`` (case-insensitive, whole words), lower-cased
    ("Answer: Solution1" → "solution1"); None if there is none. Any task of :data:`WORD_TASKS` (the commonsense
    tasks, sentiment)."""
    match = _WORD_RE[_word_task(task)].search(text)
    return match.group(1).lower() if match else None


# ---------------------------------------------------------------------------------------------- Entry points

def extract_answer(task: str, text: str) -> str | None:
    """The answer in a model output for any task of :data:`TASKS` (GSM-8K: normalised number; MATH: raw boxed
    content; commonsense and sentiment: lower-cased answer word); None if there is none."""
    name = canonical_task(task)
    if name == "gsm8k":
        return extract_gsm8k_answer(text)
    if name == "math":
        return extract_math_answer(text)
    return extract_commonsense_answer(name, text)


def is_correct(task: str, prediction_text: str, gold: str) -> bool:
    """Whether a model output answers correctly.

    ``gold``: GSM-8K, the raw answer field ("... #### 42") or the number ("42", "1,234"); MATH, the answer
    ("\\frac{1}{2}") or a full solution containing ``\\boxed{...}``; commonsense, the answer word ("option2").
    A gold that cannot be read raises ValueError (a data bug, not a wrong prediction).
    """
    name = canonical_task(task)
    pred = extract_answer(name, prediction_text)
    if name == "gsm8k":
        gold_number = gsm8k_gold(gold) if "####" in gold else _normalise_number(gold.strip().lstrip("$"))
        return numbers_equal(pred, gold_number)
    if name == "math":
        gold_answer = _last_boxed_content(gold) if ("\\boxed" in gold or "\\fbox" in gold) else gold
        if gold_answer is None:
            raise ValueError(f"MATH gold has an unreadable \\boxed answer: {_preview(gold)}")
        return math_answers_equal(pred, gold_answer)
    gold_word = gold.strip().lower()
    if gold_word not in WORD_TASKS[name]:
        raise ValueError(f"gold {gold!r} is not an answer of {name} (valid: {', '.join(WORD_TASKS[name])})")
    return pred == gold_word


def _preview(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------------------------------- Metric

class AnswerAccuracy(Metric):
    """Fraction of correct answers. ``update`` takes a bool tensor (any shape), an iterable of bools (e.g. from
    :func:`is_correct`) or one bool; 0/1 integers are accepted too. The ``correct``/``total`` counts are summed
    across processes (``dist_reduce_fx="sum"``). ``compute`` is 0.0 before any sample (torchmetrics'
    safe-division convention)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct) -> None:
        if isinstance(correct, torch.Tensor):
            flags = correct.detach().reshape(-1)
        elif isinstance(correct, bool):
            flags = torch.tensor([correct])
        else:
            flags = torch.tensor([bool(c) for c in correct], dtype=torch.bool)
        if flags.dtype != torch.bool:
            if flags.numel() and not bool(((flags == 0) | (flags == 1)).all()):
                raise ValueError("AnswerAccuracy.update expects booleans (or 0/1 values)")
            flags = flags.bool()
        self.correct += flags.sum().to(device=self.correct.device, dtype=torch.long)
        self.total += flags.numel()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(0.0, device=self.correct.device)
        return self.correct.float() / self.total
