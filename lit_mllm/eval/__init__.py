"""Evaluation: metrics (injected into a family module from its config), generation settings, baselines and the
prediction writer."""

from lit_mllm.eval.baselines import AnswerBaselines, answer_baselines
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.eval.metrics import (
    EvalMetric,
    EvalOutputs,
    GeneratedExactMatch,
    PerGroup,
    ReplyExactMatch,
    reply_exact_match,
)
from lit_mllm.eval.predictions import PredictionWriter

__all__ = [
    "AnswerBaselines",
    "answer_baselines",
    "EvalMetric",
    "EvalOutputs",
    "GeneratedExactMatch",
    "GenerationConfig",
    "PerGroup",
    "PredictionWriter",
    "ReplyExactMatch",
    "reply_exact_match",
]
