"""Grounding Acc@0.5: every task template's box format read back to pixels (values worked out by hand), the IoU
threshold on both sides of 0.5, and unreadable replies counted as wrong."""

import pytest

from lit_mllm.data.tasks import Box, MiniGPTv2Tasks, PinkTasks, PlainTasks, QwenVLTasks
from lit_mllm.eval import GroundingAccuracy, box_iou, parse_box

W, H = 200, 100
REF = [20, 10, 100, 60]  # pixels in a 200x100 image


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[grounding] {<10><10><50><60>}", (20, 10, 100, 60)),  # MiniGPT-v2: [0, 100] of the size
        (
            "<ref>the dog</ref><box>(100,100),(500,600)</box>",
            (100 / 999 * W, 100 / 999 * H, 500 / 999 * W, 600 / 999 * H),
        ),
        ("the dog [0.100, 0.100, 0.500, 0.600]", (20, 10, 100, 60)),  # plain: fractions
        ("[0.1,0.1,0.5,0.6]", (20, 10, 100, 60)),  # Pink: fractions, no spaces
        (
            "<box>( 100 , 100 ) , ( 500 , 600 )</box>",
            (100 / 999 * W, 100 / 999 * H, 500 / 999 * W, 600 / 999 * H),
        ),
    ],
)
def test_every_box_format_is_read(reply, expected):
    box = parse_box(reply, W, H)
    assert box == pytest.approx(expected)


@pytest.mark.parametrize(
    "reply",
    [
        "I cannot tell.",  # no box
        "{<10><10><150><60>}",  # MiniGPT-v2 coordinate above 100
        "<box>(500,100),(100,600)</box>",  # corners swapped
        "[0.5, 0.5, 0.1, 0.1]",
        "[0.1, 0.2, 0.3]",  # three numbers: neither a box nor a point
        "[12, 30, 80, 90]",  # integers above 1 in the fraction format
    ],
)
def test_unreadable_replies(reply):
    assert parse_box(reply, W, H) is None


def test_template_restricts_the_format():
    assert parse_box("[0.1,0.1,0.5,0.6]", W, H, QwenVLTasks()) is None
    assert parse_box("<box>(100,100),(500,600)</box>", W, H, QwenVLTasks()) is not None


@pytest.mark.parametrize("template", [MiniGPTv2Tasks(), QwenVLTasks(), PlainTasks(), PinkTasks()])
def test_each_templates_own_boxes_round_trip(template):
    """What a template writes as a target, the metric reads back to (nearly) the same box."""
    reply = template.format_box(Box(*REF), W, H)
    metric = GroundingAccuracy()
    metric.update([reply], None, [{"box": REF, "width": W, "height": H}])
    out = metric.compute()
    assert out["accuracy"].item() == 1.0 and out["miou"].item() > 0.95 and out["unparsed"].item() == 0.0


def test_iou_threshold_and_counts():
    assert box_iou((0, 0, 100, 100), (50, 0, 100, 100)) == 0.5
    assert box_iou((0, 0, 100, 100), (51, 0, 100, 100)) == pytest.approx(0.49)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    metric = GroundingAccuracy()
    meta = {"box": [0, 0, 100, 100], "width": 100, "height": 100}
    metric.update(
        ["[0.5, 0, 1.0, 1.0]", "[0.51, 0, 1.0, 1.0]", "no idea", "{<0><0><100><100>}"],
        [[], [], [], []],
        [meta] * 4,
    )
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(2 / 4)  # IoU 0.5 counts, 0.49 does not, unparsed is wrong
    assert out["unparsed"].item() == pytest.approx(1 / 4)
    assert out["miou"].item() == pytest.approx((0.5 + 0.49 + 0 + 1) / 4)


def test_missing_meta_names_what_is_missing():
    with pytest.raises(ValueError, match=r"no meta \['width', 'height'\]"):
        GroundingAccuracy().update(["[0,0,1,1]"], None, [{"box": [0, 0, 1, 1]}])
