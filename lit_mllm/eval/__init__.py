"""Evaluation: metrics (injected into a family module from its config: exact match, VQA accuracy, CIDEr-D / BLEU-4 /
ROUGE-L, grounding Acc@0.5, MME, MMBench CircularEval, POPE), generation settings, baselines and the prediction
writer."""

from lit_mllm.eval.answers import option_letter, pope_yes_no, vqa_accuracy, vqa_normalize, yes_no
from lit_mllm.eval.baselines import AnswerBaselines, answer_baselines
from lit_mllm.eval.benchmarks import CircularAccuracy, MMEScore, POPEScore
from lit_mllm.eval.captioning import BLEU4, ROUGEL, CIDErD, cider_d, coco_tokenize
from lit_mllm.eval.choice import ChoiceAccuracy, TextChoices
from lit_mllm.eval.fewshot import FewShot
from lit_mllm.eval.generation import GenerationConfig
from lit_mllm.eval.grounding import GroundingAccuracy, box_iou, parse_box
from lit_mllm.eval.metrics import (
    EvalMetric,
    EvalOutputs,
    GeneratedExactMatch,
    PerGroup,
    ReplyExactMatch,
    reply_exact_match,
)
from lit_mllm.eval.predictions import PredictionWriter
from lit_mllm.eval.samples import GenerationSamples
from lit_mllm.eval.vqa import VQAAccuracy

__all__ = [
    "AnswerBaselines",
    "answer_baselines",
    "BLEU4",
    "box_iou",
    "cider_d",
    "CIDErD",
    "CircularAccuracy",
    "coco_tokenize",
    "EvalMetric",
    "EvalOutputs",
    "GeneratedExactMatch",
    "GenerationConfig",
    "GenerationSamples",
    "GroundingAccuracy",
    "MMEScore",
    "option_letter",
    "parse_box",
    "pope_yes_no",
    "POPEScore",
    "PerGroup",
    "FewShot",
    "TextChoices",
    "ChoiceAccuracy",
    "PredictionWriter",
    "ReplyExactMatch",
    "reply_exact_match",
    "ROUGEL",
    "vqa_accuracy",
    "vqa_normalize",
    "VQAAccuracy",
    "yes_no",
]
