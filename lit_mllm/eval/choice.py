"""Text-only multiple choice by log-likelihood ranking (a TextCore-like score: what image training does to the
LLM's text ability, MM1 section 5): each question has a context and options; the model scores every option by the
log-probability of its tokens as the reply to the context, and a question counts as right when the right option
scores highest. No image is involved, so every family is scored the same way.

The pair, usable in any split::

    data.init_args.val.text_choice: {class_path: lit_mllm.eval.choice.TextChoices, init_args: {path: text_choice_val.jsonl}}
    model.init_args.metrics.text_choice: {class_path: lit_mllm.eval.choice.ChoiceAccuracy, init_args: {score: sum}}

:class:`TextChoices` reads records ``{"id", "context", "options": [...], "answer": <index of the right option>}``
(optional ``meta``) and yields one sample per (question, option): the context as the user turn and the option as
the assistant reply, rendered by the model's chat format. Its meta holds ``question_id``, ``options``, ``option``
(this sample's index) and ``answer``; its reference is the right option. The evaluation step's teacher-forced
logits then hold every option's log-likelihood: :func:`reply_logprobs` sums the log-probabilities of each sample's
supervised tokens (the option and the format's end-of-reply marker: the probability that the reply is exactly the
option), and :class:`ChoiceAccuracy` gathers them per question (across batches and ranks) and takes the argmax of
the sum, or of the mean per token (``score: mean``, which does not favour short options). The loss and the
teacher-forced metrics of such a split count the wrong options too; read its ``ChoiceAccuracy``.

:meth:`lit_mllm.lit.base.VLMModule.option_loglikelihoods` scores one context's options directly, and
:func:`text_choice_records` makes a small set from ShapesWorld's text facts (corners, colour mixes, counting,
positions): the facts the text corpus teaches, asked as questions.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.sources import JsonRecords
from lit_mllm.eval.metrics import EvalMetric, EvalOutputs
from lit_mllm.nn.language.chat import IGNORE_INDEX, Turn


def choice_samples(question_id: str, context: str, options: list[str], answer: int, meta: dict | None = None):
    """The samples of one question, one per option (see the module docstring)."""
    if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"question {question_id!r}: needs two or more non-empty options, got {options!r}")
    if not 0 <= answer < len(options):
        raise ValueError(
            f"question {question_id!r}: answer {answer} is not an index of its {len(options)} options"
        )
    common = {**(meta or {}), "question_id": question_id, "options": list(options), "answer": answer}
    return [
        Sample(
            f"{question_id}#{k}",
            [Turn("user", context), Turn("assistant", option)],
            references=[options[answer]],
            meta={**common, "option": k},
        )
        for k, option in enumerate(options)
    ]


class TextChoices(JsonRecords):
    """Text-only multiple-choice questions, ``.jsonl`` lines or a ``.json`` list of
    ``{"id", "context", "options": [...], "answer": int, "meta": {...}}``; one sample per (question, option).

    The records are read when the source opens (to count the options); they are small text."""

    def _index(self) -> int:
        records = super()._index()
        self._samples: list[Sample] = []
        for n in range(records):
            record, where = self.record(n)
            try:
                samples = choice_samples(
                    str(record.get("id", f"{self.file.name}#{n}")),
                    record["context"],
                    record["options"],
                    int(record["answer"]),
                    record.get("meta"),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"{where}: a multiple-choice record needs 'context' (str), 'options' (list of str) and "
                    f"'answer' (index of the right option): {e}"
                ) from None
            for sample in samples:
                sample.where = where
            self._samples += samples
        return len(self._samples)

    def sample(self, i: int, image_token: str) -> Sample:
        sample = self._samples[i]
        if image_token in sample.turns[0].text or image_token in sample.turns[1].text:
            raise sample.fail(f"a text-only question holds {image_token}", "image_mismatch")
        return dataclasses.replace(sample, references=list(sample.references), meta=dict(sample.meta))


def reply_logprobs(
    logits: Tensor, labels: Tensor, sample_index: Tensor, num_samples: int
) -> tuple[Tensor, Tensor]:
    """``(sum [N], tokens [N])``: each sample's total log-probability of its supervised tokens (fp32) and their
    number, from ``logits [R, L, V]`` and unshifted ``labels [R, L]`` (-100: not learned); ``sample_index [R, L]``
    says which of the ``N`` samples each position belongs to (padded or packed rows)."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX  # [R, L-1]
    return sum_by_sample(logits[:, :-1][mask], target[mask], sample_index[:, 1:][mask], num_samples)


def sum_by_sample(logits: Tensor, target: Tensor, which: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """``logits [S, V]`` at supervised positions, their ``target [S]`` and sample ``which [S]`` -> per-sample sums
    and counts."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None])[:, 0]  # [S]
    sums = torch.zeros(num_samples, device=logits.device).index_add_(0, which, logp)
    return sums, torch.bincount(which, minlength=num_samples)


def _key(question_id: str) -> int:
    """A 63-bit integer for a question id (states are tensors; gathered across ranks)."""
    return int.from_bytes(hashlib.blake2b(question_id.encode(), digest_size=8).digest(), "big") >> 1


class ChoiceAccuracy(EvalMetric):
    """Fraction of multiple-choice questions whose right option has the highest log-likelihood (see the module
    docstring). Reads samples whose meta has ``options`` (others are ignored); a question counts once all its
    options are scored (a sample seen twice, as a distributed sampler pads, counts once)."""

    full_state_update = False

    def __init__(self, score: Literal["sum", "mean"] = "sum", **kwargs) -> None:
        """
        Args:
            score: Rank options by the ``sum`` of their tokens' log-probabilities, or by their ``mean`` per token.
        """
        super().__init__(**kwargs)
        if score not in ("sum", "mean"):
            raise ValueError(f"ChoiceAccuracy score must be 'sum' or 'mean', got {score!r}")
        self.score = score
        for name in ("question", "option", "num_options", "answer", "logprob", "tokens"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logprob: Tensor, tokens: Tensor, meta: list[dict]) -> None:
        """One batch: per-sample ``logprob [N]`` (summed over the reply's tokens), ``tokens [N]`` and meta."""
        rows = [k for k, m in enumerate(meta) if "options" in m]
        if not rows:
            return
        device = logprob.device
        ints = torch.tensor(
            [
                [
                    _key(str(meta[k]["question_id"])),
                    meta[k]["option"],
                    len(meta[k]["options"]),
                    meta[k]["answer"],
                ]
                for k in rows
            ],
            dtype=torch.long,
            device=device,
        )
        picked = torch.tensor(rows, device=device)
        self.question.append(ints[:, 0])
        self.option.append(ints[:, 1])
        self.num_options.append(ints[:, 2])
        self.answer.append(ints[:, 3])
        self.logprob.append(logprob[picked].float())
        self.tokens.append(tokens[picked].float())

    def update_from(self, outputs: EvalOutputs) -> None:
        batch = outputs.batch
        logprob, tokens = reply_logprobs(outputs.logits, batch.labels, batch.sample_index, len(batch))
        self.update(logprob, tokens, batch.meta)

    def compute(self) -> Tensor:
        def cat(state):
            return torch.cat(state) if isinstance(state, list) else state

        if isinstance(self.question, list) and not self.question:
            return torch.tensor(0.0, device=self.device)
        question, option, num_options, answer = (
            cat(s).tolist() for s in (self.question, self.option, self.num_options, self.answer)
        )
        value = cat(self.logprob)
        if self.score == "mean":
            value = value / cat(self.tokens).clamp(min=1)
        scores: dict[int, dict[int, float]] = {}
        expected: dict[int, tuple[int, int]] = {}
        for q, o, n, a, v in zip(question, option, num_options, answer, value.tolist()):
            scores.setdefault(q, {})[o] = v
            expected[q] = (n, a)
        complete = [q for q, s in scores.items() if len(s) == expected[q][0]]
        right = sum(max(scores[q], key=scores[q].get) == expected[q][1] for q in complete)
        return torch.tensor(right / max(len(complete), 1), device=self.device)
