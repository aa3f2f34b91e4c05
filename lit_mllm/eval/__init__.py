"""Evaluation: metrics and baselines (benchmarks and generation-based tasks come later)."""

from lit_mllm.eval.baselines import AnswerBaselines, answer_baselines
from lit_mllm.eval.metrics import ReplyExactMatch, reply_exact_match
from lit_mllm.eval.predictions import PredictionWriter

__all__ = ["AnswerBaselines", "answer_baselines", "PredictionWriter", "ReplyExactMatch", "reply_exact_match"]
