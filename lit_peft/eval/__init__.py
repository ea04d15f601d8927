"""Evaluation helpers for the LLM experiments: answer extraction and scoring (GSM-8K, MATH, the eight
Commonsense-15K tasks, sentiment) and the ``AnswerAccuracy`` metric. See :mod:`lit_peft.eval.answers`."""

from lit_peft.eval.answers import (CLASSIFICATION_TASKS, COMMONSENSE_TASKS, TASKS, WORD_TASKS, AnswerAccuracy,
                                   canonical_task, extract_answer, extract_commonsense_answer, extract_gsm8k_answer,
                                   extract_math_answer, gsm8k_gold, is_correct, math_answers_equal,
                                   normalize_math_answer, numbers_equal)

__all__ = [
    "CLASSIFICATION_TASKS",
    "COMMONSENSE_TASKS",
    "WORD_TASKS",
    "TASKS",
    "AnswerAccuracy",
    "canonical_task",
    "extract_answer",
    "extract_commonsense_answer",
    "extract_gsm8k_answer",
    "extract_math_answer",
    "gsm8k_gold",
    "is_correct",
    "math_answers_equal",
    "normalize_math_answer",
    "numbers_equal",
]

