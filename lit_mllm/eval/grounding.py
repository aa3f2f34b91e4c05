"""Grounding (referring expression comprehension: RefCOCO/+/g): a reply's box is right when its IoU with the
reference box is at least 0.5, the accuracy every RefCOCO table reports (Acc@0.5).

Replies are read in the box formats of the task templates (:mod:`lit_mllm.data.tasks`), back to pixels with the
sample's ``width`` and ``height`` (meta):

=============== ======================================== ===========================================
template        box in the reply                         coordinates
=============== ======================================== ===========================================
MiniGPT-v2      ``{<x1><y1><x2><y2>}``                   integers in [0, 100]
Qwen-VL         ``<box>(x1,y1),(x2,y2)</box>``           integers in [0, 1000) (``q / 999 * size``)
Pink, plain     ``[x1, y1, x2, y2]`` / ``[x1,y1,x2,y2]`` fractions of the image size in [0, 1]
=============== ======================================== ===========================================

The first box of the reply is scored against meta ``box`` (``[x1, y1, x2, y2]`` in pixels). A reply with no box, or
whose box is malformed (a coordinate out of range, corners swapped), counts as wrong and is counted in
``unparsed``. IoU is computed on continuous pixel coordinates (no +1), as torchvision's ``box_iou``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mllm.data.tasks import Box, MiniGPTv2Tasks, PlainTasks, QwenVLTasks, TaskTemplate
from lit_mllm.eval.metrics import EvalMetric, EvalOutputs, generated

# one template per box syntax (Pink writes the plain syntax); tried in this order when none is given
BOX_FORMATS: tuple[TaskTemplate, ...] = (MiniGPTv2Tasks(), QwenVLTasks(), PlainTasks())


def parse_box(reply: str, width: float, height: float, template: TaskTemplate | None = None) -> Box | None:
    """The first box of ``reply`` in pixels, read with ``template``'s format or, without one, with the first
    format of :data:`BOX_FORMATS` that finds a box; None when there is none or it is malformed."""
    for fmt in (template,) if template is not None else BOX_FORMATS:
        try:
            boxes = fmt.parse_boxes(reply, width, height)
        except ValueError:  # a malformed box of this format: the reply is unreadable
            return None
        if boxes:
            return boxes[0]
    return None


def box_iou(a: Box | tuple, b: Box | tuple) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when the union is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class GroundingAccuracy(EvalMetric):
    """Fraction of replies whose box has IoU >= ``threshold`` with the reference box (module docstring).

    ``compute`` returns ``{"accuracy": ..., "miou": mean IoU (unparsed replies count 0), "unparsed": fraction of
    replies without a readable box}``. Every sample needs meta ``box``, ``width`` and ``height``.
    """

    full_state_update = False
    needs_generation = True

    def __init__(self, threshold: float = 0.5, template: TaskTemplate | None = None, **kwargs) -> None:
        """
        Args:
            threshold: IoU at or above which a box is right (0.5 for RefCOCO's Acc@0.5).
            template: The task template whose box format the replies use; None: try every template's format.
        """
        super().__init__(**kwargs)
        if not 0 < threshold <= 1:
            raise ValueError(f"GroundingAccuracy threshold must be in (0, 1], got {threshold}")
        self.threshold, self.template = threshold, template
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("unparsed", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("iou", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        predictions: list[str],
        references: list[list[str]] | None = None,
        meta: list[dict] | None = None,
    ) -> None:
        """``references`` are not read (the reference box is meta ``box``); kept for the common signature."""
        meta = meta or [{}] * len(predictions)
        for i, (reply, m) in enumerate(zip(predictions, meta, strict=True)):
            missing = [k for k in ("box", "width", "height") if k not in m]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: sample {i} of the batch has no meta {missing} (its meta: "
                    f"{sorted(m)}); the grounding reader must write the reference box in pixels and the image size"
                )
            box = parse_box(reply, m["width"], m["height"], self.template)
            self.total += 1
            if box is None:
                self.unparsed += 1
                continue
            iou = box_iou(box, m["box"])
            self.iou += iou
            self.correct += int(iou >= self.threshold)

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> dict[str, Tensor]:
        total = self.total.clamp(min=1)
        return {
            "accuracy": self.correct.float() / total,
            "miou": (self.iou / total).float(),
            "unparsed": self.unparsed.float() / total,
        }
