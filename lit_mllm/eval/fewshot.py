"""Few-shot prompting (Flamingo, Alayrac et al. 2022; MM1, McKinnon et al. 2024: 0-, 4- and 8-shot captioning and
VQA): ``k`` solved examples drawn from a support split precede each query in one interleaved sample, so a model
answers in context. A wrapper source, usable wherever a source is::

    data:
      init_args:
        val:
          vqa_4shot:
            class_path: lit_mllm.eval.fewshot.FewShot
            init_args:
              source: {class_path: lit_mllm.data.Conversations, init_args: {path: val.json}}
              support: {class_path: lit_mllm.data.Conversations, init_args: {path: train.json}}
              shots: 4

The sample of query ``q`` is one conversation, rendered by the model's chat format like any other::

    [q's system turn]  user: s1 question (its <image>)  assistant: s1 answer  ...  user: s_k question
    assistant: s_k answer  user: q's question (its <image>)  assistant: q's answer

with the support examples' images first, in order, then the query's (several images in one sample: the prefix
family splices each, the cross-attention families attend to the latest one before each position). Its id,
references and meta are the query's, so generation metrics score it as the query. The support examples are drawn
without replacement by a generator seeded by ``(seed, query id)``: the same shots for a query in every run, on
every rank and worker, whatever order samples are read in; never the query itself (a support record with the
query's id). ``shots: 0`` gives the query unchanged.

Every assistant turn of a few-shot sample is a reply, so teacher-forced metrics (``ReplyExactMatch``) and the
loss count the support answers too; score few-shot splits with generation metrics, as Flamingo and MM1 do.
"""

from __future__ import annotations

import random
from pathlib import Path

from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.sources import Source


class FewShot(Source):
    """``source``'s samples, each preceded by ``shots`` solved examples from ``support`` (see the module
    docstring)."""

    def __init__(
        self, source: Source, support: Source, shots: int = 4, seed: int = 0, weight: float = 1.0
    ) -> None:
        """
        Args:
            source: The queries (a conversation source: each record ends with the answer to score).
            support: Where the solved examples come from (a training split: conversations with their answers).
            shots: Examples before each query (Flamingo and MM1 report 0, 4 and 8).
            seed: Seed of the draw, mixed with each query's id.
            weight: Share in a training mixture (a few-shot source is normally a ``val`` / ``test`` source).
        """
        if shots < 0:
            raise ValueError(f"FewShot shots={shots}; give 0 or more solved examples per query")
        super().__init__(source.path, weight, source.image_folder)
        self.source, self.support, self.shots, self.seed = source, support, int(shots), int(seed)

    def open(self, root: Path) -> FewShot:
        """Open the queries and the support split against ``root``."""
        self.source.open(root)
        if self.shots:
            self.support.open(root)
        return super().open(root)

    def _index(self) -> int:
        return len(self.source)

    def draw(self, query: Sample) -> list[int]:
        """The support indices of ``query``'s shots: ``shots`` candidates drawn without replacement by a generator
        seeded by ``(seed, query.id)``, plus a few spares for records that turn out to be the query."""
        rng = random.Random(
            f"{self.seed}/{query.id}"
        )  # a str seed hashes with sha512: stable across processes
        n = len(self.support)
        return rng.sample(range(n), min(n, self.shots + 4))

    def examples(self, query: Sample, image_token: str) -> list[Sample]:
        """The ``shots`` support samples that precede ``query``, in order (see :meth:`draw`)."""
        shots: list[Sample] = []
        for j in self.draw(query):
            example = self.support.sample(j, image_token)
            if example.id == query.id:
                continue
            if example.text is not None or not example.turns or example.turns[-1].role != "assistant":
                raise DataError(
                    f"{example.where} (id {example.id!r}): a few-shot support example must be a conversation "
                    "ending with its answer; point FewShot.support at a conversation source"
                )
            shots.append(example)
            if len(shots) == self.shots:
                return shots
        raise query.fail(
            f"the support split {self.support.path!r} has {len(self.support)} records, too few for "
            f"{self.shots} shots other than the query; lower shots or give a larger support split"
        )

    def sample(self, i: int, image_token: str) -> Sample:
        query = self.source.sample(i, image_token)
        if not self.shots:
            return query
        if query.text is not None:
            raise query.fail("few-shot prompting needs a conversation to answer, not a document")
        shots = self.examples(query, image_token)
        system = [t for t in query.turns[:1] if t.role == "system"]
        turns = list(system)
        for example in shots:
            turns += [t for t in example.turns if t.role != "system"]
        turns += query.turns[len(system) :]
        return Sample(
            id=query.id,
            turns=turns,
            images=[ref for example in shots for ref in example.images] + list(query.images),
            where=f"{query.where} with {self.shots} shots ({', '.join(e.id for e in shots)})",
            source=query.source,
            references=list(query.references),
            meta=dict(query.meta),
        )
