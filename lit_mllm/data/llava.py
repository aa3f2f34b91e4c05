"""Reader for LLaVA-format conversation files (LLaVA-Pretrain-558K, LLaVA-Instruct-665K).

A file is a JSON list (or JSON Lines) of records::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

``image`` may be a list for multi-image records and is absent for text-only ones. Roles ``human``/``user``,
``gpt``/``assistant`` and ``system`` are accepted. Every record is checked when the file is read (cheap,
no image decoding), so structural problems stop a run before its first step, naming file and record.
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_mllm.data.sample import DataError, Sample
from lit_mllm.nn.language.chat import Turn, check_turns

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _load_records(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def parse_record(record, where: str, default_id: str, image_folder: Path, image_token: str) -> Sample:
    """One LLaVA record -> :class:`Sample`; raises :class:`DataError` naming ``where`` on any problem."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    sample_id = str(record.get("id", default_id))
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where} (id {sample_id!r}): missing or empty 'conversations' list")
    turns = []
    for k, msg in enumerate(convs):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str) or msg.get("from") not in ROLES:
            raise DataError(
                f"{where} (id {sample_id!r}): conversations[{k}] must be {{'from': one of {sorted(ROLES)}, "
                f"'value': str}}, got {msg!r}"[:400]
            )
        turns.append(Turn(ROLES[msg["from"]], msg["value"]))
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where} (id {sample_id!r}): 'image' must be a path or a list of paths")
    sample = Sample(sample_id, turns, [str(image_folder / p) for p in images], where)
    try:
        check_turns(turns)
    except ValueError as e:
        raise sample.fail(str(e)) from None
    placeholders = sum(t.text.count(image_token) for t in turns)
    if placeholders != len(images):
        raise sample.fail(
            f"{placeholders} {image_token} placeholder(s) in the text but {len(images)} image(s) listed; "
            f"each image needs exactly one {image_token} where it belongs in the text"
        )
    return sample


def read_llava(
    path: str | Path, image_folder: str | Path | None = None, image_token: str = "<image>"
) -> list[Sample]:
    """Read and check a LLaVA-format ``.json`` / ``.jsonl`` file; image paths resolve against ``image_folder``
    (default: the file's folder)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    return [
        parse_record(r, f"{path} record {i}", f"{path.name}#{i}", folder, image_token)
        for i, r in enumerate(_load_records(path))
    ]
