"""Readers for the benchmark files people download, as :class:`~lit_mllm.data.sources.Source` s for ``val`` / ``test``
/ ``predict`` splits: every question becomes a one-turn conversation (the image, the question, the benchmark's
standard instruction; the reply is the answer to score), with the accepted answers as
:attr:`~lit_mllm.data.sample.Sample.references` and what the metrics group by as
:attr:`~lit_mllm.data.sample.Sample.meta`.

    data:
      init_args:
        val:
          vqav2: {class_path: lit_mllm.data.VQAv2, init_args: {path: vqav2/v2_OpenEnded_mscoco_val2014_questions.json,
                  annotations: vqav2/v2_mscoco_val2014_annotations.json, image_folder: coco/val2014}}
          mme: {class_path: lit_mllm.data.MME, init_args: {path: MME_Benchmark_release_version}}

=================== ======================================================= ================================
source              files (their official layout)                            references / meta
=================== ======================================================= ================================
:class:`VQAv2`      ``v2_OpenEnded_mscoco_*_questions.json`` +               the ten human answers;
                    ``v2_mscoco_*_annotations.json``                         ``question_id``, ``answer_type``
:class:`TextVQA`    ``TextVQA_0.5.1_*.json`` (``data`` list, ten answers)    the ten answers; ``question_id``
:class:`GQA`        ``*_balanced_questions.json`` (an object keyed by id)    the answer; ``question_id``, types
:class:`COCOCaptions` ``captions_*.json`` (``images`` + ``annotations``)     every caption of the image
:class:`RefCOCO`    RefCOCO/+/g refs + instances, or flattened rows          the box in the template's format;
                    (read by :class:`~lit_mllm.data.sources.Grounding`)      ``box`` (pixels), ``width``, ``height``
:class:`MME`        a folder per subtask: ``images/`` +                      ``Yes`` / ``No``; ``subtask``,
                    ``questions_answers_YN/*.txt``, or image + ``.txt``       ``category``, ``image``
:class:`MMBench`    ``MMBench_*.tsv`` (images as base64)                     the letter; ``group``, ``options``
:class:`POPE`       ``coco_pope_{random,popular,adversarial}.json`` lines   ``yes`` / ``no``; ``split``
=================== ======================================================= ================================

Prompts follow LLaVA-1.5's evaluation (``<image>\\n{question}\\n{instruction}``): VQA, GQA and POPE ask for "a
single word or phrase", MME keeps its own "Please answer yes or no.", MMBench lists the options after the hint and
question and asks for the letter; ``instruction`` overrides a benchmark's default ("" for none).

An index is built when a source is opened (the question and annotation files are read once); a record is parsed
when drawn, so a malformed one is a :class:`~lit_mllm.data.sample.DataError` naming the file and the record. A
benchmark split published without answers (VQAv2 test-dev, GQA or MMBench test) gives an empty reply and no
references: such a source serves ``predict`` (answers for the benchmark's server), not scores.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from lit_mllm.data.sample import DataError, Sample
from lit_mllm.data.sources import IMAGE_EXTENSIONS, Grounding, Source
from lit_mllm.data.tasks import PlainTasks, TaskTemplate
from lit_mllm.nn.language.chat import Turn

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short-answer VQA (VQAv2, GQA, TextVQA, POPE)."""
YES_NO = "Please answer yes or no."
"""MME's instruction, which its questions already end with."""
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's MMBench instruction."""
CAPTION = "Provide a one-sentence caption for the provided image."
"""The COCO captioning instruction of lmms-eval's ``coco_cap`` tasks."""


def question_turns(question: str, answer: str, image_token: str, instruction: str) -> list[Turn]:
    """One question about one image as LLaVA-1.5 evaluates it: ``<image>\\n{question}\\n{instruction}``, then the
    reply to score (``answer``; "" when the benchmark publishes none)."""
    text = f"{image_token}\n{question}" + (f"\n{instruction}" if instruction else "")
    return [Turn("user", text), Turn("assistant", answer)]


def _load_json(path: Path, what: str, root: Path):
    """A whole JSON file; :class:`DataError` naming it when it is missing or not JSON."""
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what}; root {root})", "missing_file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None


def _field(record: dict, key: str, kind: type | tuple[type, ...], where: str):
    """``record[key]`` if it is a ``kind``, else :class:`DataError` naming ``where`` and the field."""
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}: needs {names} field {key!r}, got {value!r}"[:400])
    return value


class _Benchmark(Source):
    """A benchmark source: the instruction every prompt ends with, and a weight of 1 (benchmarks are not mixed)."""

    default_instruction: str = SHORT_ANSWER

    def __init__(self, path: str, image_folder: str | None = None, instruction: str | None = None) -> None:
        super().__init__(path, 1.0, image_folder)
        self.instruction = self.default_instruction if instruction is None else instruction

    def image_path(self, name: str) -> str:
        return str(self.folder / name)


def _majority(answers: list[str]) -> str:
    """The most frequent answer (the first of the tied ones), the reply a teacher-forced loss learns."""
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a]) if answers else ""


def _human_answers(record: dict, where: str) -> list[str]:
    """VQAv2's ``answers`` (``[{"answer": str, ...}]``) or TextVQA's (``[str]``) as strings."""
    answers = _field(record, "answers", list, where)
    out = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(a, str) for a in out):
        raise DataError(
            f"{where}: 'answers' must hold strings or {{'answer': str}} objects, got {answers!r}"[:400]
        )
    return out


class VQAv2(_Benchmark):
    """VQAv2 (Goyal et al. 2017) in its official files: ``path`` the questions
    (``v2_OpenEnded_mscoco_val2014_questions.json``: ``{"data_subtype": "val2014", "questions": [{"image_id",
    "question", "question_id"}]}``) and ``annotations`` the answers (``v2_mscoco_val2014_annotations.json``:
    ``{"annotations": [{"question_id", "answers": [ten {"answer": ...}], "multiple_choice_answer",
    "answer_type", "question_type"}]}``). References are the ten human answers (the official accuracy compares a
    reply with them); the reply to learn is ``multiple_choice_answer``. Images are COCO's
    ``COCO_val2014_000000262148.jpg`` in ``image_folder`` (``image_pattern`` for other names)."""

    def __init__(
        self,
        path: str,
        annotations: str | None = None,
        image_folder: str | None = None,
        image_pattern: str = "COCO_{data_subtype}_{image_id:012d}.jpg",
        instruction: str | None = None,
    ) -> None:
        """
        Args:
            path: The questions file (``v2_OpenEnded_mscoco_<subtype>_questions.json``).
            annotations: The annotations file (``v2_mscoco_<subtype>_annotations.json``); None for a split
                published without answers (test-dev: predictions only).
            image_folder: Folder of the COCO images (``val2014``); default: the questions file's folder.
            image_pattern: Image file name from ``image_id`` and the questions file's ``data_subtype``; COCO 2017
                names are ``{image_id:012d}.jpg``.
            instruction: Appended to each question; default LLaVA-1.5's "Answer the question using a single word
                or phrase." ("" for none).
        """
        super().__init__(path, image_folder, instruction)
        self.annotations, self.image_pattern = annotations, image_pattern

    def _index(self) -> int:
        questions = _load_json(self.file, "VQAv2 questions", self.root)
        if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
            raise DataError(f"{self.file}: not a VQAv2 questions file (an object with a 'questions' list)")
        self._questions, self._subtype = questions["questions"], questions.get("data_subtype", "")
        self._answers: dict | None = None
        if self.annotations is not None:
            path = self.root / self.annotations
            annotations = _load_json(path, "VQAv2 annotations", self.root)
            if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
                raise DataError(
                    f"{path}: not a VQAv2 annotations file (an object with an 'annotations' list)"
                )
            self._answers = {
                a.get("question_id"): a for a in annotations["annotations"] if isinstance(a, dict)
            }
        return len(self._questions)

    def sample(self, i: int, image_token: str) -> Sample:
        where = f"{self.file} questions[{i}]"
        record = self._questions[i]
        qid = _field(record, "question_id", int, where)
        where = f"{where} (question_id {qid})"
        question, image_id = _field(record, "question", str, where), _field(record, "image_id", int, where)
        try:
            image = self.image_pattern.format(image_id=image_id, data_subtype=self._subtype)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{where}: image_pattern {self.image_pattern!r} does not fit ({e!r})") from None
        meta: dict = {"question_id": qid}
        answers, reply = [], ""
        if self._answers is not None:
            ann = self._answers.get(qid)
            if ann is None:
                raise DataError(
                    f"{where}: no annotation with this question_id in {self.root / self.annotations}; use the "
                    "annotations of the same split as the questions"
                )
            ann_where = f"{self.root / self.annotations} annotation of question_id {qid}"
            answers = _human_answers(ann, ann_where)
            reply = ann.get("multiple_choice_answer")
            reply = reply if isinstance(reply, str) else _majority(answers)
            meta["answer_type"] = _field(ann, "answer_type", str, ann_where)
            if isinstance(ann.get("question_type"), str):
                meta["question_type"] = ann["question_type"]
        turns = question_turns(question, reply, image_token, self.instruction)
        return Sample(str(qid), turns, [self.image_path(image)], where, references=answers, meta=meta)


class TextVQA(_Benchmark):
    """TextVQA (Singh et al. 2019), ``TextVQA_0.5.1_val.json``: ``{"data": [{"question_id", "question",
    "image_id", "answers": [ten strings], ...}]}``; images ``{image_id}.jpg`` in ``image_folder``
    (``train_images`` holds the train and val images). References are the ten answers (scored like VQAv2's); the
    reply to learn is the most frequent one. ``ocr_tokens``: LLaVA's variant with the file's OCR tokens in the
    prompt (``Reference OCR token: ...``)."""

    def __init__(
        self,
        path: str,
        image_folder: str | None = None,
        image_pattern: str = "{image_id}.jpg",
        instruction: str | None = None,
        ocr_tokens: bool = False,
    ) -> None:
        """
        Args:
            path: The TextVQA JSON file.
            image_folder: Folder of the images; default: the file's folder.
            image_pattern: Image file name from the record's fields.
            instruction: Appended to each question; default "Answer the question using a single word or phrase.".
            ocr_tokens: Add the record's ``ocr_tokens`` to the question as LLaVA-1.5's TextVQA prompt does.
        """
        super().__init__(path, image_folder, instruction)
        self.image_pattern, self.ocr_tokens = image_pattern, ocr_tokens

    def _index(self) -> int:
        data = _load_json(self.file, "TextVQA", self.root)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise DataError(f"{self.file}: not a TextVQA file (an object with a 'data' list)")
        self._records = data["data"]
        return len(self._records)

    def sample(self, i: int, image_token: str) -> Sample:
        where = f"{self.file} data[{i}]"
        record = self._records[i]
        qid = _field(record, "question_id", int, where)
        where = f"{where} (question_id {qid})"
        question = _field(record, "question", str, where)
        _field(record, "image_id", str, where)
        try:
            image = self.image_pattern.format(**record)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{where}: image_pattern {self.image_pattern!r} does not fit ({e!r})") from None
        answers = _human_answers(record, where) if "answers" in record else []
        if self.ocr_tokens:
            tokens = _field(record, "ocr_tokens", list, where)
            question = f"{question}\nReference OCR token: {', '.join(map(str, tokens))}"
        turns = question_turns(question, _majority(answers), image_token, self.instruction)
        meta = {"question_id": qid}
        return Sample(str(qid), turns, [self.image_path(image)], where, references=answers, meta=meta)


class GQA(_Benchmark):
    """GQA (Hudson & Manning 2019), ``testdev_balanced_questions.json``: an object keyed by question id,
    ``{"201307251": {"imageId": "n161313", "question": ..., "answer": "no", "types": {"structural", "semantic",
    "detailed"}, ...}}``; images ``{imageId}.jpg`` in ``image_folder``. The reference is the one ``answer``;
    meta adds the question ``types`` GQA reports accuracy by."""

    def __init__(
        self,
        path: str,
        image_folder: str | None = None,
        image_pattern: str = "{imageId}.jpg",
        instruction: str | None = None,
    ) -> None:
        """
        Args:
            path: The GQA questions file.
            image_folder: Folder of GQA's ``images``; default: the file's folder.
            image_pattern: Image file name from the record's fields.
            instruction: Appended to each question; default "Answer the question using a single word or phrase.".
        """
        super().__init__(path, image_folder, instruction)
        self.image_pattern = image_pattern

    def _index(self) -> int:
        questions = _load_json(self.file, "GQA questions", self.root)
        if not isinstance(questions, dict):
            raise DataError(f"{self.file}: not a GQA questions file (an object keyed by question id)")
        self._questions = questions
        self._ids = list(questions)
        return len(self._ids)

    def sample(self, i: int, image_token: str) -> Sample:
        qid = self._ids[i]
        where = f"{self.file} question {qid!r}"
        record = self._questions[qid]
        question = _field(record, "question", str, where)
        _field(record, "imageId", str, where)
        try:
            image = self.image_pattern.format(**record)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{where}: image_pattern {self.image_pattern!r} does not fit ({e!r})") from None
        answer = _field(record, "answer", str, where) if "answer" in record else None
        meta: dict = {"question_id": qid}
        types = record.get("types")
        if isinstance(types, dict):
            meta.update({f"{k}_type": v for k, v in types.items() if isinstance(v, str)})
        turns = question_turns(question, answer or "", image_token, self.instruction)
        references = [] if answer is None else [answer]
        return Sample(qid, turns, [self.image_path(image)], where, references=references, meta=meta)


class COCOCaptions(_Benchmark):
    """COCO captions (Chen et al. 2015), ``captions_val2014.json``: ``{"images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]}``; one sample per image, its references every caption of it (five,
    for CIDEr), the reply to learn the first. An image without a caption is bad (``missing_caption``)."""

    default_instruction = CAPTION

    def __init__(self, path: str, image_folder: str | None = None, instruction: str | None = None) -> None:
        """
        Args:
            path: The captions file.
            image_folder: Folder of the images (``val2014``); default: the file's folder.
            instruction: The captioning prompt; default "Provide a one-sentence caption for the provided image.".
        """
        super().__init__(path, image_folder, instruction)

    def _index(self) -> int:
        data = _load_json(self.file, "COCO captions", self.root)
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations")
        ):
            raise DataError(
                f"{self.file}: not a COCO captions file (an object with 'images' and 'annotations')"
            )
        self._images = data["images"]
        self._captions: dict = {}
        for k, ann in enumerate(data["annotations"]):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            self._captions.setdefault(image_id, []).append((k, ann))
        return len(self._images)

    def sample(self, i: int, image_token: str) -> Sample:
        where = f"{self.file} images[{i}]"
        image = self._images[i]
        image_id = _field(image, "id", int, where)
        where = f"{where} (id {image_id})"
        name = _field(image, "file_name", str, where)
        captions = []
        for k, ann in self._captions.get(image_id, []):
            caption = ann.get("caption")
            if not isinstance(caption, str):
                raise DataError(
                    f"{self.file} annotations[{k}] (image_id {image_id}): 'caption' must be a string"
                )
            captions.append(caption.strip())
        if not any(captions):
            raise DataError(f"{where}: no caption of this image in 'annotations'", "missing_caption")
        turns = [Turn("user", f"{image_token}\n{self.instruction}"), Turn("assistant", captions[0])]
        meta = {"image_id": image_id}
        return Sample(str(image_id), turns, [self.image_path(name)], where, references=captions, meta=meta)


class RefCOCO(Grounding):
    """RefCOCO / RefCOCO+ / RefCOCOg referring-expression comprehension for evaluation: :class:`Grounding` with the
    ``refer`` task only (the expression in, its box out, in the task template's format), one sample per referring
    expression, read by default from the refer toolkit's refs + instances files. Each sample's meta holds the
    ground-truth ``box`` (``[x1, y1, x2, y2]`` pixels) with the image's ``width`` / ``height``, which the
    grounding metric compares a parsed reply with (accuracy at IoU >= 0.5)."""

    def __init__(
        self,
        path: str,
        template: TaskTemplate | None = None,
        image_folder: str | None = None,
        format: Literal["objects", "rows", "refer"] = "refer",
        split: str | None = None,
        instances: str | None = None,
        box_format: Literal["xyxy", "xywh"] | None = None,
        image_pattern: str | None = None,
        trust_pickle: bool = False,
    ) -> None:
        """
        Args:
            path: The refs file (``refs(unc).json``), or a rows / objects file (see ``format``).
            template: Task template giving the instruction and box format the model was trained with; default
                :class:`~lit_mllm.data.tasks.PlainTasks`.
            image_folder: Folder of the COCO ``train2014`` images; default: the file's folder.
            format: ``refer`` (refs + instances), ``rows`` (flattened RefCOCO rows) or ``objects``; see
                :class:`Grounding`.
            split: The RefCOCO split to keep (``val``, ``testA``, ``testB``, ``test``); None keeps all.
            instances: ``refer``: the COCO instances file; default ``instances.json`` beside the refs.
            box_format: How the file writes boxes; default the format's convention (see :class:`Grounding`).
            image_pattern: ``rows`` without an image path: the file name from the row's fields.
            trust_pickle: Read a pickled refs file (see :class:`Grounding`).
        """
        super().__init__(
            path,
            template or PlainTasks(),
            image_folder=image_folder,
            tasks=["refer"],
            format=format,
            box_format=box_format,
            split=split,
            instances=instances,
            image_pattern=image_pattern,
            trust_pickle=trust_pickle,
        )


MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
"""MME's cognition subtasks (summed to its cognition total)."""
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
"""MME's perception subtasks (summed to its perception total)."""


class MME(_Benchmark):
    """MME (Fu et al. 2023) in its release folder (``MME_Benchmark_release_version``): a folder per subtask, either
    ``images/`` + ``questions_answers_YN/`` (artwork, celebrity, landmark, posters, scene) or each image beside a
    ``.txt`` of the same stem (the others). Each line of a ``.txt`` is ``question<TAB>answer`` with answer ``Yes``
    or ``No``; an image has two questions (MME's accuracy+ wants both right). Meta: ``subtask``, ``category``
    (``perception`` / ``cognition``) and ``image`` (``subtask/file name``, shared by an image's questions)."""

    default_instruction = YES_NO

    def __init__(self, path: str, subtasks: list[str] | None = None, instruction: str | None = None) -> None:
        """
        Args:
            path: The MME release folder (holding a folder per subtask).
            subtasks: Subtasks to read; default every one of MME's fourteen found in ``path`` (at least one).
            instruction: Appended to a question that does not already end with it; default MME's own "Please
                answer yes or no.".
        """
        super().__init__(path, None, instruction)
        known = MME_PERCEPTION + MME_COGNITION
        unknown = sorted(set(subtasks or ()) - set(known))
        if unknown:
            raise ValueError(f"MME: unknown subtasks {unknown}; MME's subtasks are {list(known)}")
        self.subtasks = subtasks

    def _index(self) -> int:
        if not self.file.is_dir():
            raise DataError(
                f"{self.file}: no such folder (the MME release folder; root {self.root})", "missing_file"
            )
        wanted = self.subtasks or [s for s in MME_PERCEPTION + MME_COGNITION if (self.file / s).is_dir()]
        if not wanted:
            raise DataError(
                f"{self.file}: holds none of MME's subtask folders ({', '.join(MME_PERCEPTION + MME_COGNITION)})",
                "missing_file",
            )
        self._lines = []  # (subtask, txt file, line number, line, image path or None)
        for subtask in wanted:
            folder = self.file / subtask
            if not folder.is_dir():
                raise DataError(f"{folder}: no such folder (subtask {subtask!r} of MME)", "missing_file")
            split_layout = (folder / "questions_answers_YN").is_dir()
            txts = sorted((folder / "questions_answers_YN" if split_layout else folder).glob("*.txt"))
            if not txts:
                raise DataError(f"{folder}: no question files (.txt) for subtask {subtask!r}", "missing_file")
            images = folder / "images" if split_layout else folder
            for txt in txts:
                image = next(
                    (p for e in IMAGE_EXTENSIONS if (p := images / f"{txt.stem}.{e}").is_file()), None
                )
                lines = txt.read_text(encoding="utf-8").splitlines()
                self._lines += [
                    (subtask, txt, n, line, image) for n, line in enumerate(lines, 1) if line.strip()
                ]
        return len(self._lines)

    def sample(self, i: int, image_token: str) -> Sample:
        subtask, txt, n, line, image = self._lines[i]
        where = f"{txt} line {n}"
        question, tab, answer = line.rstrip("\n").rpartition("\t")
        if not tab or not question.strip() or answer.strip().lower() not in ("yes", "no"):
            raise DataError(f"{where}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line!r}"[:400])
        if image is None:
            raise DataError(
                f"{where}: no image {txt.stem}.{{{','.join(IMAGE_EXTENSIONS)}}} for this question file",
                "missing_file",
            )
        answer = answer.strip().capitalize()
        question = question.strip()
        instruction = "" if question.endswith(self.instruction) else self.instruction
        turns = question_turns(question, answer, image_token, instruction)
        category = "cognition" if subtask in MME_COGNITION else "perception"
        meta = {"subtask": subtask, "category": category, "image": f"{subtask}/{image.name}"}
        sample_id = f"{subtask}/{txt.stem}/{n}"
        return Sample(sample_id, turns, [str(image)], where, references=[answer], meta=meta)


_TSV_FIELD = re.compile(r'"([^"]*(?:""[^"]*)*)"|([^\t"]*)')


def _tsv_fields(record: str, where: str) -> list[str]:
    """The fields of one TSV record as pandas and ``csv`` write it (a field holding a tab, newline or quote is
    quoted, its quotes doubled); written out here because ``csv`` refuses fields over its module-wide size limit
    (MMBench's base64 images) unless that limit is raised for the whole process."""
    fields, pos = [], 0
    while True:
        m = _TSV_FIELD.match(record, pos)
        quoted, plain = m.group(1), m.group(2)
        fields.append(quoted.replace('""', '"') if quoted is not None else plain)
        pos = m.end()
        if pos == len(record):
            return fields
        if record[pos] != "\t":
            raise DataError(f"{where}: malformed TSV (stray quote at character {pos})")
        pos += 1


def _tsv_records(path: Path) -> list[tuple[int, int, int]]:
    """``(line number, byte offset, byte length)`` of each record of a TSV file; a quoted field may span lines (a
    record ends where its quotes balance). Only offsets are kept: a record (with its image) is read when drawn."""
    records, start, line_no, first, quotes = [], 0, 1, 1, 0
    offset = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if quotes == 0:
                start, first = offset, n
            quotes = (quotes + line.count(b'"')) % 2
            offset += len(line)
            if quotes == 0 and line.strip():
                records.append((first, start, offset - start))
            line_no = n
    if quotes:
        raise DataError(
            f"{path} line {first}: a quoted field is not closed before the end of the file (of {line_no})"
        )
    return records


def _missing(value: str | None) -> bool:
    """An empty cell as pandas writes and LLaVA reads it: empty, ``nan`` or ``none``."""
    return value is None or value.strip().lower() in ("", "nan", "none")


class MMBench(_Benchmark):
    """MMBench (Liu et al. 2023) TSV files (``MMBench_DEV_EN.tsv``, ``MMBench_TEST_CN.tsv``, ...): columns ``index``,
    ``question``, ``hint``, ``A``..``D`` (options; empty ones absent), ``answer`` (the letter; absent from test
    files), ``category``, ``l2-category``, ``image`` (base64; a short value is the ``index`` of the row whose image
    it shares, as VLMEvalKit writes repeated images).

    The prompt is LLaVA-1.5's: the hint, the question, ``A. option`` lines, then "Answer with the option's letter
    from the given choices directly.". With ``circular`` (MMBench's CircularEval) each question gives one sample
    per rotation of its options (``index/r``: rotation ``r`` moves option ``k`` to letter ``k - r``), all in the
    ``group`` of the question's index, so the metric can ask that every rotation be right. Meta: ``group``,
    ``options`` (letter -> text as shown), ``category``, ``l2_category``, ``rotation``."""

    default_instruction = OPTION_LETTER

    def __init__(
        self,
        path: str,
        circular: bool = True,
        instruction: str | None = None,
        letters: str = "ABCDEFGHI",
    ) -> None:
        """
        Args:
            path: The MMBench ``.tsv`` file.
            circular: One sample per rotation of the options (CircularEval); False: the options as written.
            instruction: The line after the options; default "Answer with the option's letter from the given
                choices directly.".
            letters: Option columns looked for, in order (MMBench has ``A``..``D``).
        """
        super().__init__(path, None, instruction)
        self.circular, self.letters = circular, letters

    def _index(self) -> int:
        if not self.file.is_file():
            raise DataError(f"{self.file}: no such file (MMBench TSV; root {self.root})", "missing_file")
        records = _tsv_records(self.file)
        if not records:
            raise DataError(f"{self.file}: empty TSV (expected a header row and questions)")
        header_line, *rows = records
        self._header = _tsv_fields(self._read(header_line).rstrip("\r\n"), f"{self.file} line 1")
        missing = [c for c in ("index", "question", "image") if c not in self._header]
        if missing:
            raise DataError(f"{self.file}: no column {missing} in the header {self._header}"[:400])
        self._rows = rows
        self._options = [c for c in self.letters if c in self._header]
        self._by_index = {}  # the index column's value -> row number (rows may share another row's image)
        self._entries = []  # (row number, rotation)
        for k in range(len(rows)):
            try:
                row, _ = self.row(k)
            except DataError:
                self._entries.append((k, 0))  # reported when drawn
                continue
            self._by_index[row["index"].strip()] = k
            count = sum(not _missing(row[c]) for c in self._options)
            self._entries += [(k, r) for r in range(max(1, count) if self.circular else 1)]
        return len(self._entries)

    def _read(self, record: tuple[int, int, int]) -> str:
        with open(self.file, "rb") as f:
            f.seek(record[1])
            return f.read(record[2]).decode("utf-8")

    def row(self, k: int) -> tuple[dict[str, str], str]:
        """Row ``k`` (0-based, after the header) as ``{column: value}``, and where it is."""
        record = self._rows[k]
        where = f"{self.file} line {record[0]}"
        fields = _tsv_fields(self._read(record).rstrip("\r\n"), where)
        if len(fields) != len(self._header):
            raise DataError(f"{where}: {len(fields)} fields for the header's {len(self._header)} columns")
        return dict(zip(self._header, fields)), where

    def _image(self, row: dict[str, str], where: str) -> bytes:
        value = row["image"].strip()
        if len(value) <= 64 and value in self._by_index:  # VLMEvalKit: the index of the row holding the image
            value = self.row(self._by_index[value])[0]["image"].strip()
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: the 'image' column is not base64 ({e})", "undecodable_image") from None

    def sample(self, i: int, image_token: str) -> Sample:
        k, rotation = self._entries[i]
        row, where = self.row(k)
        index = row["index"].strip()
        where = f"{where} (index {index})"
        question = row["question"]
        if _missing(question):
            raise DataError(f"{where}: empty 'question'")
        present = [c for c in self._options if not _missing(row[c])]
        texts = [row[c] for c in present]
        if len(texts) < 2:
            raise DataError(f"{where}: needs at least two options in columns {self._options}, got {texts}")
        answer = row.get("answer")
        position = None
        if not _missing(answer):
            answer = answer.strip()
            if answer not in present:
                raise DataError(f"{where}: answer {answer!r} is not one of the options {present}")
            position = present.index(answer)
        shown = texts[rotation:] + texts[:rotation]
        options = {self.letters[j]: text for j, text in enumerate(shown)}
        lines = [] if _missing(row.get("hint")) else [row["hint"]]
        lines += [question] + [f"{letter}. {text}" for letter, text in options.items()]
        letter = "" if position is None else self.letters[(position - rotation) % len(texts)]
        turns = question_turns("\n".join(lines), letter, image_token, self.instruction)
        group = int(index) if index.lstrip("-").isdigit() else index
        meta = {"group": group, "options": options, "rotation": rotation}
        for column, key in (("category", "category"), ("l2-category", "l2_category")):
            if not _missing(row.get(column)):
                meta[key] = row[column]
        sample_id = f"{index}/{rotation}" if self.circular else index
        references = [letter] if letter else []
        return Sample(sample_id, turns, [self._image(row, where)], where, references=references, meta=meta)


POPE_SPLITS = ("random", "popular", "adversarial")
"""POPE's three ways of choosing the absent objects asked about."""


class POPE(_Benchmark):
    """POPE (Li et al. 2023) question files (``coco_pope_random.json`` etc., one JSON object per line:
    ``{"question_id", "image", "text", "label": "yes"|"no"}``); images in ``image_folder`` (COCO ``val2014``). The
    reference is the label; meta ``split`` (random / popular / adversarial) comes from the file name unless given."""

    def __init__(
        self,
        path: str,
        image_folder: str | None = None,
        split: str | None = None,
        instruction: str | None = None,
    ) -> None:
        """
        Args:
            path: One POPE question file.
            image_folder: Folder of the images; default: the file's folder.
            split: ``random``, ``popular`` or ``adversarial``; default: the one the file name holds.
            instruction: Appended to each question; default "Answer the question using a single word or phrase.".
        """
        super().__init__(path, image_folder, instruction)
        if split is not None and split not in POPE_SPLITS:
            raise ValueError(f"POPE split must be one of {list(POPE_SPLITS)}, got {split!r}")
        self.split = split

    def _index(self) -> int:
        if not self.file.is_file():
            raise DataError(f"{self.file}: no such file (POPE questions; root {self.root})", "missing_file")
        named = [s for s in POPE_SPLITS if s in self.file.stem]
        if self.split is None and len(named) != 1:
            raise DataError(
                f"{self.file}: the file name does not say which POPE split it holds ({', '.join(POPE_SPLITS)}); "
                "set split on this POPE source"
            )
        self._split = self.split or named[0]
        lines = self.file.read_text(encoding="utf-8").splitlines()
        self._lines = [(f"{self.file} line {n}", line) for n, line in enumerate(lines, 1) if line.strip()]
        return len(self._lines)

    def sample(self, i: int, image_token: str) -> Sample:
        where, line = self._lines[i]
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        qid = _field(record, "question_id", (int, str), where)
        where = f"{where} (question_id {qid})"
        question, image = _field(record, "text", str, where), _field(record, "image", str, where)
        label = _field(record, "label", str, where).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: 'label' must be 'yes' or 'no', got {record['label']!r}")
        turns = question_turns(question, label, image_token, self.instruction)
        meta = {"question_id": qid, "split": self._split}
        sample_id = f"{self._split}/{qid}"
        return Sample(sample_id, turns, [self.image_path(image)], where, references=[label], meta=meta)
