"""Loss on supervised tokens only, the zero-supervision error, reply exact match vs a brute-force reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.eval.metrics import ReplyExactMatch, reply_exact_match
from lit_mllm.lit.base import NoSupervisedTokens, lm_loss


def test_loss_only_on_supervised_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, -100, -100, -100]])
    terms = [
        F.cross_entropy(logits[0, 1], torch.tensor(3)),
        F.cross_entropy(logits[0, 2], torch.tensor(4)),
        F.cross_entropy(logits[1, 0], torch.tensor(7)),
    ]
    torch.testing.assert_close(lm_loss(logits, labels), torch.stack(terms).mean())
    # changing an unsupervised position's logits leaves the loss unchanged
    logits2 = logits.clone()
    logits2[0, 4] += 100
    logits2[1, 3] -= 50
    torch.testing.assert_close(lm_loss(logits2, labels), lm_loss(logits, labels))


def test_batch_without_supervision_raises():
    labels = torch.full((2, 4), -100)
    labels[0, 0] = 5  # the first position is never a target after the shift
    with pytest.raises(NoSupervisedTokens, match=r"\['a', 'b'\]"):
        lm_loss(torch.randn(2, 4, 9), labels, ["a", "b"])


def brute_force(pred, labels):
    correct = total = 0
    for row_pred, row_lab in zip(pred.tolist(), labels.tolist()):
        run_ok, in_run = True, False
        for p, t in zip(row_pred[:-1], row_lab[1:]):
            if t != -100:
                run_ok = (run_ok if in_run else True) and p == t
                in_run = True
            elif in_run:
                correct, total, in_run = correct + run_ok, total + 1, False
        if in_run:
            correct, total = correct + run_ok, total + 1
    return correct, total


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_reply_exact_match_equals_brute_force(data):
    b, length, vocab = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 12)), 4
    pred = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length), min_size=b, max_size=b
            )
        )
    )
    labels = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.sampled_from([-100, -100, 0, 1, 2, 3]), min_size=length, max_size=length),
                min_size=b,
                max_size=b,
            )
        )
    )
    logits = F.one_hot(pred, vocab).float()
    correct, total = reply_exact_match(logits, labels)
    assert (int(correct), int(total)) == brute_force(pred, labels)


def test_metric_accumulates():
    m = ReplyExactMatch()
    logits = F.one_hot(torch.tensor([[0, 1, 2, 3]]), 4).float()
    m.update(logits, torch.tensor([[-100, 0, 1, -100]]))  # correct
    m.update(logits, torch.tensor([[-100, 0, 3, -100]]))  # wrong second token
    assert float(m.compute()) == 0.5
