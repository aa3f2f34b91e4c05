"""``lit-mllm score-data``: per-sample perplexity against one computed by hand from the model's logits, the keep
rule (exactly floor(f * n), the lowest perplexities, ties by id), the sidecar surviving a kill and a rerun, and the
filtered copy of each source written in its own format."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.cli import run
from lit_mllm.commands.lightning import build_cli
from lit_mllm.data import Captions, Conversations, Grounding, TextOnly, collate, read_llava
from lit_mllm.data.subsets import check_supported
from lit_mllm.eval.perplexity import FIELDS, Score, batch_scores, read_scores, select
from lit_mllm.training.checkpoints import atomic_save
from tests.conftest import cli_args

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
SMALLER = [  # the quickstart's model made smaller (16 image tokens, two thin layers): CPU seconds
    "--model.init_args.vision_tower.init_args.image_size", "32",
    "--model.init_args.language_model.init_args.hidden_size", "64",
    "--model.init_args.language_model.init_args.num_layers", "2",
]  # fmt: skip


def test_perplexity_is_exp_of_the_mean_token_loss_computed_by_hand(model, shapes_root):
    proc = model.processor()
    samples = read_llava(shapes_root / "captions_train.json")[:2] + read_llava(shapes_root / "train.json")[:2]
    document = TextOnly("text_train.jsonl").open(shapes_root).sample(0, proc.image_token)
    batch = collate([proc(s) for s in samples + [document]], proc.tokenizer.pad_token_id)
    model.eval()
    scores = batch_scores(model, batch, "mix", [10, 11, 12, 13, 14])
    with torch.no_grad():
        logits = model(batch).double()  # [R, L, V], the whole forward pass
    for r, score in enumerate(scores):
        nll = []
        for t in range(batch.input_ids.shape[1] - 1):
            target = int(batch.labels[r, t + 1])
            if target != -100:
                nll.append(-F.log_softmax(logits[r, t], dim=-1)[target].item())
        assert score.tokens == len(nll) > 0
        assert score.id == batch.ids[r] and score.index == 10 + r and score.source == "mix"
        assert score.mean_loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
        assert score.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # a sample's perplexity does not depend on the batch it is scored in (padding is not read)
    alone = batch_scores(model, collate([proc(samples[2])], proc.tokenizer.pad_token_id), "mix", [12])[0]
    assert alone.perplexity == pytest.approx(scores[2].perplexity, rel=1e-5)


def rows(perplexities: list[float], ids: list[str] | None = None, skipped: dict[int, str] | None = None):
    ids = ids or [f"r{i:03d}" for i in range(len(perplexities))]
    skipped = skipped or {}
    return [Score("s", i, ids[i], 3, math.log(p), p, skipped.get(i, "")) for i, p in enumerate(perplexities)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([1.5, 2.0, 2.0, 3.25, 7.0, 11.0]), min_size=1, max_size=40),
    st.floats(0, 1),
    st.sampled_from(["ascending", "descending"]),
)
def test_keep_takes_exactly_the_floor_of_the_fraction_and_the_extreme_end(values, fraction, order):
    scores = rows(values, skipped={0: "too_long"})  # a record that could not be processed is never kept
    kept = select(scores, keep=fraction, order=order)
    scored = [s for s in scores if s.scored]
    assert len(kept) == math.floor(fraction * len(scored))
    assert all(s.scored for s in kept)
    dropped = [s for s in scored if s not in kept]
    if kept and dropped:
        if order == "ascending":
            assert max(s.perplexity for s in kept) <= min(s.perplexity for s in dropped)
        else:
            assert min(s.perplexity for s in kept) >= max(s.perplexity for s in dropped)
    # ties at the cut are broken by id: the kept ones of the cut's perplexity have the smallest ids
    if kept and dropped:
        cut = kept[-1].perplexity
        tied_kept = [s.id for s in kept if s.perplexity == cut]
        tied_dropped = [s.id for s in dropped if s.perplexity == cut]
        assert all(a < b for a in tied_kept for b in tied_dropped)


def test_keep_rule_by_hand_and_threshold():
    scores = rows([5.0, 1.0, 3.0, 3.0, 9.0, 2.0, 4.0], ids=["g", "f", "e", "d", "c", "b", "a"])
    assert [s.id for s in select(scores, keep=0.5)] == ["f", "b", "d"]  # floor(3.5) = 3; 3.0 tie: d before e
    assert [s.id for s in select(scores, keep=0.5, order="descending")] == ["c", "g", "a"]
    assert [s.id for s in select(scores, threshold=3.0)] == ["f", "b", "d", "e"]
    assert [s.id for s in select(scores, threshold=5.0, order="descending")] == ["c", "g"]
    assert select(scores, keep=0.0) == [] and len(select(scores, keep=1.0)) == 7
    with pytest.raises(ValueError, match="exactly one"):
        select(scores, keep=0.2, threshold=3.0)


def test_sidecar_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text(",".join(FIELDS) + "\ns,0,a,3,0.5,1.6487212707001282,\ns,1,b,3,0.7,2.01")
    assert [s.id for s in read_scores(path)] == ["a"]
    assert path.read_text().endswith("1.6487212707001282,\n")


def caption_config(tmp_path: Path, shapes_root: Path) -> str:
    """Training sources in three formats over ShapesWorld's caption pairs; in the LLaVA one, record 3's image is
    missing."""
    records = json.loads((shapes_root / "captions_train.json").read_text())
    records[3]["image"] = "images/missing.png"
    (tmp_path / "captions_train.json").write_text(json.dumps(records))
    path = tmp_path / "captions.yaml"
    path.write_text(
        "data:\n  init_args:\n    train:\n"
        f"      llava: {{class_path: lit_mllm.data.Conversations, init_args: {{path: {tmp_path / 'captions_train.json'}, "
        f"image_folder: {shapes_root}}}}}\n"
        "      manifest: {class_path: lit_mllm.data.Captions, init_args: {path: captions_train.csv}}\n"
        "      shards: {class_path: lit_mllm.data.Captions, init_args: {path: captions_train}}\n"
    )
    return str(path)


def checkpoint_of(args: list[str], path: Path) -> Path:
    """The config's model as built, saved as a checkpoint of its stage (trainable weights only)."""
    model = build_cli(args, run=False).model
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save({"state_dict": state, "lit_mllm": {"stage": model.stage.name}}, path)
    return path


def test_score_data_filters_every_format_and_resumes_after_a_kill(tmp_path, shapes_root):
    args = ["--config", QUICKSTART, "--config", caption_config(tmp_path, shapes_root), *SMALLER]
    args += cli_args(shapes_root, tmp_path, batch_size=8)
    ckpt = checkpoint_of(args, tmp_path / "model.ckpt")
    out = tmp_path / "scored"
    command = ["score-data", *args, "--ckpt_path", str(ckpt), "--out", str(out), "--keep", "0.25"]
    report = run(command)
    first = read_scores(out / "scores.csv")
    assert len(first) == 3 * 24 and len({(s.source, s.index) for s in first}) == len(first)
    [bad] = [s for s in first if not s.scored]
    assert (bad.source, bad.index, bad.id, bad.skipped) == (
        "llava",
        3,
        "train_000003_caption",
        "missing_file",
    )
    assert report["sources"]["llava"]["skipped"] == {"missing_file": 1}

    for name, source in report["sources"].items():
        n = 23 if name == "llava" else 24
        assert source["scored"] == n and source["kept"] == math.floor(0.25 * n)
        kept = select([s for s in first if s.source == name], keep=0.25)
        assert source["cut_perplexity"] == kept[-1].perplexity
        assert len(source["lowest"]) == len(source["highest"]) == 5
        assert source["lowest"][0]["perplexity"] <= source["highest"][0]["perplexity"]
        assert (out / source["histogram"]).stat().st_size > 0
        written = source["filtered"]["init_args"]
        cls = {"llava": Conversations, "manifest": Captions, "shards": Captions}[name]
        assert source["filtered"]["class_path"] == f"lit_mllm.data.sources.{cls.__name__}"
        copy = cls(written["path"], image_folder=written.get("image_folder")).open(Path("/"))
        got = sorted(copy.sample(i, "<image>").id for i in range(len(copy)))
        assert got == sorted(s.id for s in kept)
        copy.sample(0, "<image>")  # its images resolve
    # JSON records are kept as they were
    original = {r["id"]: r for r in json.loads((tmp_path / "captions_train.json").read_text())}
    llava = json.loads(Path(report["sources"]["llava"]["filtered"]["init_args"]["path"]).read_text())
    assert all(r == original[r["id"]] for r in llava)
    with open(report["sources"]["manifest"]["filtered"]["init_args"]["path"], newline="") as f:
        assert next(csv.reader(f)) == ["image", "caption"]

    # a kill part-way: the rows after the bad record lost, the line being written cut short; a rerun scores only
    # what is missing, checking the ids of what it skips
    text = (out / "scores.csv").read_text().splitlines(keepends=True)
    assert text[4].startswith("llava,3,train_000003_caption,0,nan,nan,missing_file")
    (out / "scores.csv").write_text("".join(text[:6]) + text[6][:7])
    run(command)
    again = read_scores(out / "scores.csv")
    by_key = {(s.source, s.index): s for s in first}
    assert len(again) == len(first)
    for s in again:
        assert s.id == by_key[s.source, s.index].id
        assert s.skipped == by_key[s.source, s.index].skipped
        assert s.perplexity == pytest.approx(by_key[s.source, s.index].perplexity, rel=1e-5, nan_ok=True)

    other = torch.load(ckpt, weights_only=True)
    next(iter(other["state_dict"].values())).add_(1.0)
    atomic_save(other, tmp_path / "other.ckpt")
    other = tmp_path / "other.ckpt"
    with pytest.raises(ValueError, match="another --out"):
        run(["score-data", *args, "--ckpt_path", str(other), "--out", str(out)])


def test_formats_without_records_are_refused_by_name(tmp_path):
    rows_source = Grounding("refcoco.jsonl", template=None, format="rows")
    with pytest.raises(ValueError, match="'refcoco'.*Grounding source in the 'rows' form"):
        check_supported(rows_source, "refcoco")

    class Elsewhere(TextOnly):
        pass

    with pytest.raises(ValueError, match="'web' is a Elsewhere; a filtered copy can be written of"):
        check_supported(Elsewhere("x.jsonl"), "web")
