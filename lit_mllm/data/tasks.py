"""Task templates: how a vision-language task becomes one user turn and one assistant turn in the text
conventions of a model family. Datasets supply the fields, chat formats wrap the turns; this registry only holds
each family's instruction pools and box format (the shape of Honeybee's ``templates``). Pick a family by
``class_path`` in YAML; override pools with ``instructions``.

Families:
- :class:`MiniGPTv2Tasks` (MiniGPT-v2, Chen et al. 2023): ``<Img><image></Img> [vqa] question``; task
  identifiers ``[vqa] [caption] [grounding] [refer] [identify] [detection]``; boxes ``{<x1><y1><x2><y2>}``,
  integers in [0, 100], ``floor(x * 100 / width)`` (the paper says "normalized in [0, 100]"; its training code
  truncates, so do we); several boxes of one phrase joined by ``<delim>``, phrases marked ``<p>...</p>``. Its
  ``[INST] ... [/INST]`` wrapper is the chat format ``Llama2Inst``.
- :class:`QwenVLTasks` (Qwen-VL, Bai et al. 2023), its multi-task pretraining formats: ``<img><image></img>``
  then the task prompt; ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``, integers in [0, 1000):
  ``round(x * 999 / width)``, the inverse of Qwen-VL's own grounding evaluation (``q / 999 * width``).
- :class:`PinkTasks` (Pink, Xuan et al. 2024), referential tasks: boxes ``[x1,y1,x2,y2]`` and points ``[x,y]``
  as fractions of the image size with 3 decimals; prompts mark regions ``<loc>...</loc>`` and phrases
  ``<des>...</des>`` (Pink's ``add_marks``); the user turn opens ``Image: <image>`` followed directly by the
  instruction, as Pink's prompt does.
- :class:`PlainTasks`: neutral, no identifiers; ``[x1, y1, x2, y2]`` / ``[x, y]`` as fractions, 3 decimals.

Tasks, their fields and their target (the assistant turn); boxes are pixel :class:`Box` es (or 4-sequences):

=========== ========================================== =============================================
vqa         question, answer                           answer
caption     caption                                    caption
grounding   caption, objects [(phrase, box), ...]      caption with the boxes after each phrase
refer       phrase, box                                the box
identify    phrase, box or point                       the phrase
detection   objects [(label, box), ...]                every label with its boxes
region_vqa  question, answer, box or point             answer
=========== ========================================== =============================================

Instruction placeholders: ``{question}``, ``{phrase}``, ``{region}`` (the formatted box or point) and, for
detection, ``{labels}`` (distinct labels joined by ", "). In ``grounding`` consecutive objects with the same
phrase share one mention. :meth:`TaskTemplate.parse_boxes` raises ``ValueError`` naming any malformed box.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple, get_args

from lit_mllm.nn.language.chat import Turn

Task = Literal["vqa", "caption", "grounding", "refer", "identify", "detection", "region_vqa"]
TASKS: tuple[str, ...] = get_args(Task)
# task: (text fields it needs, placeholders its instructions may use); dropping the input ones is refused
FIELDS: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "vqa": (("question", "answer"), {"question"}),
    "caption": (("caption",), set()),
    "grounding": (("caption",), set()),
    "refer": (("phrase",), {"phrase"}),
    "identify": (("phrase",), {"region"}),
    "detection": ((), {"labels"}),
    "region_vqa": (("question", "answer"), {"question", "region"}),
}


class Box(NamedTuple):
    """A box in pixels: top-left ``(x1, y1)``, bottom-right ``(x2, y2)``."""

    x1: float
    y1: float
    x2: float
    y2: float

    def check(self, width: float, height: float) -> Box:
        """Return the box if ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``, else raise ValueError."""
        if not (0 <= self.x1 < self.x2 <= width and 0 <= self.y1 < self.y2 <= height):
            raise ValueError(
                f"box {tuple(self)} is not a box inside the {width}x{height} image (need 0 <= x1 < x2 <= width, "
                "0 <= y1 < y2 <= height); fix the annotation or clip it with Box.clip"
            )
        return self

    def clip(self, width: float, height: float) -> Box:
        """The box clamped to the image (it may become empty; :meth:`check` says so)."""
        return Box(*(min(max(v, 0), size) for v, size in zip(self, (width, height) * 2)))


class Point(NamedTuple):
    """A point in pixels."""

    x: float
    y: float

    def check(self, width: float, height: float) -> Point:
        """Return the point if it lies in the image, else raise ValueError."""
        if not (0 <= self.x <= width and 0 <= self.y <= height):
            raise ValueError(f"point {tuple(self)} is outside the {width}x{height} image")
        return self


def _parse(
    text: str, find: str, exact: str, scale: float, width: float, height: float, skip: str = ""
) -> list[Box]:
    """Boxes of ``text`` in pixels: every ``find`` match must fully match ``exact`` (4 numbers in [0, scale])."""
    boxes = []
    for m in re.finditer(find, text):
        if skip and re.fullmatch(skip, m.group(0)):
            continue
        exact_match = re.fullmatch(exact, m.group(0))
        q = [float(v) for v in exact_match.groups()] if exact_match else []
        if not q or not all(0 <= v <= scale for v in q) or q[0] > q[2] or q[1] > q[3]:
            raise ValueError(
                f"malformed box {m.group(0)!r} at character {m.start()}: expected 4 coordinates in [0, {scale}] "
                "with x1 <= x2 and y1 <= y2"
            )
        boxes.append(Box(*(v * size / scale for v, size in zip(q, (width, height) * 2))))
    return boxes


class TaskTemplate(ABC):
    """A model family's task conventions: instruction pools, image placement, box format.

    Subclasses set ``INSTRUCTIONS`` (task -> pool; a family renders the tasks it has pools for), ``LAYOUT``
    (where the image goes), and implement :meth:`format_box`, :meth:`parse_boxes` and :meth:`span`.
    """

    INSTRUCTIONS: ClassVar[dict[str, list[str]]] = {}
    LAYOUT: ClassVar[str] = "{image}\n{instruction}"
    DETECTION_SEP: ClassVar[str] = " "

    def __init__(self, instructions: dict[str, list[str]] | None = None) -> None:
        """
        Args:
            instructions: Instruction pools replacing this family's, per task (other tasks keep theirs), e.g.
                ``{"vqa": ["[vqa] {question}"]}``. Placeholders: ``{question}``, ``{phrase}``, ``{region}``,
                ``{labels}`` (see the module docstring); one instruction is drawn per sample.
        """
        pools = {**self.INSTRUCTIONS, **(instructions or {})}
        for task, pool in pools.items():
            if task not in TASKS:
                raise ValueError(f"instructions: unknown task {task!r}; tasks are {', '.join(TASKS)}")
            if not isinstance(pool, list) or not pool or not all(isinstance(s, str) for s in pool):
                raise ValueError(f"instructions[{task!r}] must be a non-empty list of strings, got {pool!r}")
            for text in pool:
                try:
                    names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
                except ValueError as e:
                    raise ValueError(
                        f"instructions[{task!r}]: {text!r} is not a format string: {e}"
                    ) from None
                allowed = FIELDS[task][1]
                if not names <= allowed or not allowed - {"labels"} <= names:
                    raise ValueError(
                        f"instructions[{task!r}]: {text!r} uses {sorted(names)}; {task} instructions must use "
                        f"{sorted(allowed - {'labels'})} and may use {sorted(allowed)} (write literal braces "
                        "as {{ }})"
                    )
        self.instructions = {task: list(pool) for task, pool in pools.items()}

    @abstractmethod
    def format_box(self, box: Box | tuple, width: float, height: float) -> str:
        """The box (pixels, checked against the image) in this family's text format."""

    @abstractmethod
    def parse_boxes(self, text: str, width: float, height: float) -> list[Box]:
        """Every box written in ``text``, in order, back in pixels (up to the format's quantisation)."""

    @abstractmethod
    def span(self, phrase: str, boxes: list[str]) -> str:
        """A phrase with its formatted boxes, as written in grounded captions and detections."""

    def format_point(self, point: Point | tuple, width: float, height: float) -> str:
        raise ValueError(f"{type(self).__name__} has no point format; give a box or use PinkTasks/PlainTasks")

    def detection(self, objects: list[tuple[str, Box]], width: float, height: float) -> str:
        """Detection target: each label once (first-seen order) with all its boxes."""
        groups: dict[str, list[str]] = {}
        for label, box in objects:
            groups.setdefault(label, []).append(self.format_box(box, width, height))
        return self.DETECTION_SEP.join(self.span(label, boxes) for label, boxes in groups.items())

    def grounded_caption(
        self, caption: str, objects: list[tuple[str, Box]], width: float, height: float
    ) -> str:
        """The caption with each object's boxes placed at its phrase; objects follow the caption's order."""
        out, pos = [], 0
        for phrase, group in itertools.groupby(objects, key=lambda o: o[0]):
            start = caption.find(phrase, pos) if phrase else -1
            if start < 0:
                raise ValueError(
                    f"grounding: phrase {phrase!r} is not in the caption {caption!r} after character {pos}; "
                    "objects must be phrases of the caption, in the caption's order"
                )
            boxes = [self.format_box(box, width, height) for _, box in group]
            out += [caption[pos:start], self.span(phrase, boxes)]
            pos = start + len(phrase)
        return "".join(out) + caption[pos:]

    def render(
        self, task: Task, fields: dict, image_token: str, width: int, height: int, rng: random.Random
    ) -> list[Turn]:
        """One sample of ``task``: a user turn (the image placeholder, a drawn instruction) and the target."""
        if task not in self.instructions:
            raise ValueError(
                f"{type(self).__name__} has no instructions for task {task!r}; it renders "
                f"{', '.join(self.instructions)} (tasks are {', '.join(TASKS)}; add a pool with `instructions`)"
            )
        for name in FIELDS[task][0]:
            if not isinstance(fields.get(name), str) or not fields[name].strip():
                raise ValueError(f"{task} sample needs a non-empty string {name!r}, got {fields.get(name)!r}")
        objects = []
        if task in ("grounding", "detection"):
            objects = [(label, Box(*box)) for label, box in fields.get("objects") or []]
            if not objects:
                raise ValueError(f"{task} sample has no 'objects' (phrase, box) pairs; nothing to learn")
        region, box, point = "", fields.get("box"), fields.get("point")
        if task == "refer" and box is None:
            raise ValueError(f"refer sample needs a 'box', got fields {sorted(fields)}")
        if task in ("identify", "region_vqa") and (box is None) == (point is None):
            raise ValueError(f"{task} sample needs one of 'box' and 'point', got fields {sorted(fields)}")
        if task in ("refer", "identify", "region_vqa"):
            region = (
                self.format_box(Box(*box), width, height)
                if box is not None
                else self.format_point(Point(*point), width, height)
            )
        values = {
            "question": fields.get("question", ""),
            "phrase": fields.get("phrase", ""),
            "region": region,
            "labels": ", ".join(dict.fromkeys(label for label, _ in objects)),
        }
        instruction = rng.choice(self.instructions[task]).format(**values)
        target = {
            "vqa": lambda: fields["answer"],
            "caption": lambda: fields["caption"],
            "grounding": lambda: self.grounded_caption(fields["caption"], objects, width, height),
            "refer": lambda: region,
            "identify": lambda: fields["phrase"],
            "detection": lambda: self.detection(objects, width, height),
            "region_vqa": lambda: fields["answer"],
        }[task]()
        user = self.LAYOUT.format(image=image_token, instruction=instruction)
        if user.count(image_token) != 1 or image_token in target:
            raise ValueError(
                f"{task} sample's fields contain the image token {image_token!r}; remove it, the template places "
                "the image"
            )
        return [Turn("user", user), Turn("assistant", target)]


class MiniGPTv2Tasks(TaskTemplate):
    """MiniGPT-v2's task identifiers and ``{<x1><y1><x2><y2>}`` boxes (integers in [0, 100])."""

    INSTRUCTIONS = {
        "vqa": [
            "[vqa] {question}",
            "[vqa] Based on the image, respond to this question with a short answer: {question}",
        ],
        "caption": [
            "[caption] A short image description:",
            "[caption] Briefly describe the content of the image.",
        ],
        "grounding": [
            "[grounding] please describe this image in details",
            "[grounding] describe this image as detailed as possible",
        ],
        "refer": [
            "[refer] {phrase}",
            "[refer] give me the location of {phrase}",
            "[refer] where is {phrase} ?",
        ],
        "identify": [
            "[identify] {region}",
            "[identify] what object is in this location {region}",
            "[identify] describe this object in {region}",
        ],
        "detection": ["[detection] {labels}"],
    }
    LAYOUT = "<Img>{image}</Img> {instruction}"

    def format_box(self, box, width, height):
        b = Box(*box).check(width, height)
        # floor(x * 100 / size); the epsilon keeps exact multiples (and re-formatted parses) from rounding down
        q = [int(v * 100 / s + 1e-6) for v, s in zip(b, (width, height) * 2)]
        return "{{<{}><{}><{}><{}>}}".format(*q)

    def parse_boxes(self, text, width, height):
        return _parse(text, r"\{<[^{}]*>\}", r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}", 100, width, height)

    def span(self, phrase, boxes):
        return f"<p>{phrase}</p> " + "<delim>".join(boxes)


class QwenVLTasks(TaskTemplate):
    """Qwen-VL's ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` (integers in [0, 1000)) and task prompts."""

    INSTRUCTIONS = {
        "vqa": ["{question} Answer:"],
        "caption": ["Generate the caption in English:"],
        "grounding": ["Generate the caption in English with grounding:"],
        "refer": ["<ref>{phrase}</ref>"],
        "identify": ["<ref>This</ref>{region} is"],
        "detection": ["Detect all objects with grounding:"],  # not a Qwen-VL prompt: it has no detection task
    }
    LAYOUT = "<img>{image}</img>{instruction}"
    DETECTION_SEP = ""

    def format_box(self, box, width, height):
        b = Box(*box).check(width, height)
        q = [round(v * 999 / s) for v, s in zip(b, (width, height) * 2)]
        return "<box>({},{}),({},{})</box>".format(*q)

    def parse_boxes(self, text, width, height):
        n = r"\s*(\d+)\s*"
        return _parse(
            text, r"<box>.*?</box>", rf"<box>\s*\({n},{n}\)\s*,\s*\({n},{n}\)\s*</box>", 999, width, height
        )

    def span(self, phrase, boxes):
        return f"<ref>{phrase}</ref>" + "".join(boxes)


class PlainTasks(TaskTemplate):
    """Neutral: no identifiers; boxes ``[x1, y1, x2, y2]`` and points ``[x, y]`` as fractions, 3 decimals.

    When parsing, every bracketed list of numbers must be a box or a point (others are reported malformed).
    """

    INSTRUCTIONS = {
        "vqa": ["{question}"],
        "caption": ["Describe the image briefly."],
        "grounding": ["Describe the image and give the box [x1, y1, x2, y2] of each object you mention."],
        "refer": ["Where is {phrase}? Answer with its box [x1, y1, x2, y2]."],
        "identify": ["What is in the region {region}?"],
        "detection": ["Detect every object; give each label with its box [x1, y1, x2, y2]."],
        "region_vqa": ["{question} {region}"],
    }
    DETECTION_SEP = "; "
    SEP: ClassVar[str] = ", "

    def format_box(self, box, width, height):
        b = Box(*box).check(width, height)
        return "[" + self.SEP.join(f"{v / s:.3f}" for v, s in zip(b, (width, height) * 2)) + "]"

    def format_point(self, point, width, height):
        p = Point(*point).check(width, height)
        return f"[{p.x / width:.3f}{self.SEP}{p.y / height:.3f}]"

    def parse_boxes(self, text, width, height):
        n = r"\s*(\d+(?:\.\d+)?)\s*"
        point = rf"\[{n},{n}\]"  # points are not boxes: skipped
        return _parse(text, r"\[[\d.,\s+-]*\]", rf"\[{n},{n},{n},{n}\]", 1.0, width, height, skip=point)

    def span(self, phrase, boxes):
        return f"{phrase} " + " ".join(boxes)


class PinkTasks(PlainTasks):
    """Pink's referential tasks: ``[x1,y1,x2,y2]`` / ``[x,y]`` fractions (3 decimals), marked ``<loc>``/``<des>``."""

    INSTRUCTIONS = {
        "vqa": ["{question}", "I require a brief and clear answer for this question: {question}"],
        "caption": ["Describe this image as simply as possible.", "Briefly say the content of this scene."],
        "grounding": [
            "Can you provide a description of the image and include the coordinates [x0,y0,x1,y1] for "
            "each mentioned object?"
        ],
        "refer": [
            "Where is <des>{phrase}</des>?",
            "What are the coordinates of <des>{phrase}</des> in the image?",
        ],
        "identify": ["Describe the object in <loc>{region}</loc>.", "What is at <loc>{region}</loc>?"],
        "detection": ["Locate and classify all instances in the image."],
        "region_vqa": ["{question} <loc>{region}</loc>"],
    }
    LAYOUT = "Image: {image}{instruction}"
    SEP = ","

    def detection(self, objects, width, height):
        return " ".join(f"{self.format_box(box, width, height)} {label}" for label, box in objects)
