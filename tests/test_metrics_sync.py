"""Every evaluation metric gives, from data split over two ranks, what one instance gives on all of it: once with
``merge_state`` and once through torchmetrics' own synchronisation (``_sync_dist``), its all-gather replaced by
one that hands rank 0 what another instance sent. The splits cut across the groups the metrics form (an MME
image's two questions, an MMBench question's rotations, the CIDEr-D corpus' document frequencies)."""

import pytest
import torch

from lit_mllm.eval import (
    BLEU4,
    ROUGEL,
    CIDErD,
    CircularAccuracy,
    GeneratedExactMatch,
    GroundingAccuracy,
    MMEScore,
    POPEScore,
    VQAAccuracy,
)

CAPTIONS = (
    ["a dog runs", "two cats on a mat", "a red ball", "a man in a park", "the blue sky"],
    [
        ["a dog is running", "the dog runs"],
        ["two cats sit on a mat"],
        ["a red ball on grass", "red ball"],
        ["a man walks in the park", "a person in a park", "man in park"],
        ["a clear blue sky"],
    ],
)
LETTERS = {"A": "dog", "B": "cat"}
CASES = {
    "cider": (CIDErD, *CAPTIONS, [{}] * 5),
    "bleu": (BLEU4, *CAPTIONS, [{}] * 5),
    "rouge": (ROUGEL, *CAPTIONS, [{}] * 5),
    "vqa": (
        VQAAccuracy,
        ["yes", "2", "red", "no"],
        [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 3 + ["blue"] * 7, ["yes"] * 9 + ["no"]],
        [{"answer_type": t} for t in ("yes/no", "number", "other", "yes/no")],
    ),
    "exact": (
        GeneratedExactMatch,
        ["2", "cat", "dog", "square"],
        [["2"], ["cat"], ["cat"], ["square"]],
        [{"kind": "count"}, {"kind": "shape"}, {"kind": "shape"}, {"kind": "shape"}],
    ),
    "mme": (
        MMEScore,
        ["Yes", "No", "Yes", "Yes", "No", "No"],
        [["Yes"], ["No"], ["Yes"], ["No"], ["Yes"], ["No"]],
        [{"subtask": s, "image": i} for s, i in [("count", 1), ("count", 2), ("count", 1)] * 2],
    ),
    "mmbench": (
        CircularAccuracy,
        ["A", "B", "A", "A", "B", "B"],
        [["A"], ["B"], ["A"], ["B"], ["B"], ["A"]],
        [{"group": g, "options": LETTERS} for g in ("q1", "q1", "q2", "q2", "q3", "q3")],
    ),
    "pope": (
        POPEScore,
        ["yes", "no", "yes", "no", "yes", "no"],
        [["yes"], ["no"], ["no"], ["yes"], ["yes"], ["yes"]],
        [{"split": s} for s in ("random", "popular", "adversarial") * 2],
    ),
    "grounding": (
        GroundingAccuracy,
        ["[0, 0, 0.5, 0.5]", "[0.5, 0, 1, 1]", "none", "[0, 0, 1, 1]"],
        [[], [], [], []],
        [{"box": [0, 0, 50, 50], "width": 100, "height": 100}] * 4,
    ),
}


def _halves(data):
    """Rank 0 gets the even samples, rank 1 the odd ones (so groups span the ranks)."""
    return [tuple(column[r::2] for column in data) for r in (0, 1)]


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    else:
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_ranks_give_the_one_instance_result(name):
    make, *data = CASES[name]
    whole = make()
    whole.update(*data)
    expected = whole.compute()
    rank0, rank1 = _halves(data)

    merged, other = make(), make()
    merged.update(*rank0)
    other.update(*rank1)
    merged.merge_state(other)
    _close(merged.compute(), expected)

    sent = []  # what rank 1 all-gathers, in torchmetrics' order of states

    def record(tensor, group=None):
        sent.append(tensor)
        return [tensor]

    sender = make(dist_sync_fn=record, distributed_available_fn=lambda: True)
    sender.update(*rank1)
    sender.compute()
    calls = iter(sent)

    def gather(tensor, group=None):
        return [tensor, next(calls)]

    receiver = make(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    receiver.update(*rank0)
    _close(receiver.compute(), expected)
    assert next(calls, None) is None  # every state was gathered
