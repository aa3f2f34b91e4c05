"""Few-shot prompts (lit_mllm.eval.fewshot.FewShot): the shots are drawn reproducibly from the query's id (not the
order samples are read in), never the query itself, precede the query in one conversation with their images first;
the sample keeps the query's id, references and meta; shots: 0 is the query unchanged; a few-shot split loads
through the DataModule and generates with the prefix and cross-attention families."""

from __future__ import annotations

import json

import pytest
import torch

from lit_mllm.data import Conversations, MixtureData
from lit_mllm.data.sample import DataError
from lit_mllm.eval.fewshot import FewShot
from tests.conftest import tiny_model
from tests.test_flamingo import tiny_flamingo

TOKEN = "<image>"


def few_shot(root, shots=4, seed=0, query="val.json", support="train.json") -> FewShot:
    return FewShot(Conversations(query), Conversations(support), shots=shots, seed=seed).open(root)


def test_shots_precede_the_query_with_their_images_first(shapes_root):
    source = few_shot(shapes_root)
    query = Conversations("val.json").open(shapes_root).sample(3, TOKEN)
    support = Conversations("train.json").open(shapes_root)
    sample = source.sample(3, TOKEN)
    assert (sample.id, sample.references, sample.meta) == (query.id, query.references, query.meta)
    shots = source.examples(query, TOKEN)
    assert len(shots) == 4 and len({s.id for s in shots}) == 4
    assert {s.id for s in shots} <= {support.sample(j, TOKEN).id for j in range(len(support))}
    assert sample.turns == [t for s in shots for t in s.turns] + query.turns
    assert sample.images == [im for s in shots for im in s.images] + query.images
    assert sum(t.text.count(TOKEN) for t in sample.turns) == len(sample.images) == 5


def test_the_draw_is_reproducible_from_the_query_id_and_changes_with_the_seed(shapes_root):
    first = few_shot(shapes_root)
    order = list(range(len(first)))
    again = few_shot(shapes_root)
    samples = [first.sample(i, TOKEN) for i in order]
    assert [again.sample(i, TOKEN) for i in reversed(order)] == samples[::-1]  # read order does not matter
    other = [few_shot(shapes_root, seed=1).sample(i, TOKEN) for i in order]
    assert [s.turns for s in other] != [s.turns for s in samples]
    # different queries get different shots
    assert len({tuple(s.images[:4]) for s in samples}) > 1


def test_never_the_query_itself(shapes_root):
    # support = the queries' own file, as small as the shots allow: every other record must be used
    source = few_shot(shapes_root, shots=7, query="val.json", support="val.json")
    queries = Conversations("val.json").open(shapes_root)
    assert len(queries) == 8
    for i in range(len(source)):
        query = queries.sample(i, TOKEN)
        shot_ids = [s.id for s in source.examples(query, TOKEN)]
        assert query.id not in shot_ids and len(set(shot_ids)) == 7
        assert source.sample(i, TOKEN).images[-1] == query.images[-1]
    with pytest.raises(DataError, match="too few"):
        few_shot(shapes_root, shots=8, query="val.json", support="val.json").sample(0, TOKEN)


def test_zero_shots_give_the_query_unchanged(shapes_root):
    source = few_shot(shapes_root, shots=0)
    queries = Conversations("val.json").open(shapes_root)
    assert len(source) == len(queries)
    assert [source.sample(i, TOKEN) for i in range(len(queries))] == [
        queries.sample(i, TOKEN) for i in range(len(queries))
    ]
    with pytest.raises(ValueError, match="shots=-1"):
        FewShot(Conversations("val.json"), Conversations("train.json"), shots=-1)


def test_a_document_support_record_is_refused(shapes_root, tmp_path):
    (tmp_path / "docs.json").write_text(json.dumps([{"id": "d", "conversations": []}]))
    source = FewShot(Conversations("val.json"), Conversations(str(tmp_path / "docs.json")), shots=1)
    source.open(shapes_root)
    with pytest.raises(DataError, match="conversations"):
        source.sample(0, TOKEN)


@pytest.mark.parametrize("build", [tiny_model, tiny_flamingo], ids=["prefix", "flamingo"])
def test_a_few_shot_split_loads_and_generates(build, shapes_root):
    model = build().eval()
    data = MixtureData(
        str(shapes_root),
        train={"shapesworld": Conversations("train.json")},
        val={"two_shot": FewShot(Conversations("val.json"), Conversations("train.json"), shots=2)},
        batch_size=4,
        num_workers=0,
    )
    proc = model.processor()
    proc.eval_prompts = True
    data.connect(proc)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    batch = batch[0] if isinstance(batch, tuple | list) else batch
    queries = Conversations("val.json").open(shapes_root)
    assert batch.ids == [queries.sample(i, TOKEN).id for i in range(4)]
    assert batch.images_per_row == [3, 3, 3, 3]  # two shots' images and the query's
    assert batch.generation.references == [[queries.sample(i, TOKEN).turns[-1].text] for i in range(4)]
    with torch.no_grad():
        replies = model.generate(batch.generation, max_new_tokens=3)
    assert len(replies) == 4
