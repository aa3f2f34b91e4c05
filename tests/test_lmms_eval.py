"""The lmms-eval adapter through lmms-eval's own model interface (its ``Instance`` requests, its model registry and,
marked slow, its evaluator on tasks written into tmp_path), offline, on the suite's tiny model: replies and
log-likelihoods equal those computed directly from the module."""

import io

import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (the optional extra: pip install 'lit-mllm[lmms-eval]')"
)

from lmms_eval.api.instance import Instance  # noqa: E402

from lit_mllm.data import Sample, collate  # noqa: E402
from lit_mllm.eval.lmms_eval import LitMLLM, manifest  # noqa: E402
from lit_mllm.nn.language.chat import Turn  # noqa: E402

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
DOCS = [{"colour": c, "question": f"Is the square {c}?"} for c in COLOURS]


def doc_to_visual(doc):
    return [Image.new("RGB", (32, 32), COLOURS[doc["colour"]])]


def png(doc) -> bytes:
    buf = io.BytesIO()
    doc_to_visual(doc)[0].save(buf, format="PNG")
    return buf.getvalue()


def request(kind, doc_id, second, context=None):
    """A request as lmms-eval's ``ConfigurableTask.construct_requests`` builds it for a simple model."""
    context = DOCS[doc_id]["question"] if context is None else context
    args = (context, second, doc_to_visual, doc_id, "toy", "test")
    return Instance(kind, args, idx=0, metadata={"task": "toy", "doc_id": doc_id, "repeats": 1})


def adapter(model, **kwargs) -> LitMLLM:
    lm = LitMLLM(model, **kwargs)
    lm.task_dict = {"toy": {"test": DOCS}}  # lmms-eval's evaluator sets this to the tasks' datasets
    return lm


def prompt_item(model, doc, text):
    """The processed prompt of one question, built by hand: the image placeholder, a newline, the text."""
    proc = model.processor()
    token = proc.image_token
    sample = Sample("ref", [Turn("user", f"{token}\n{text}"), Turn("assistant", "")], [png(doc)])
    return proc(sample, for_generation=True)


def reference_reply(model, doc, text, **overrides) -> str:
    proc = model.processor()
    batch = collate([prompt_item(model, doc, text)], proc.tokenizer.pad_token_id, padding_side="left")
    return model.generate(batch, **overrides)[0]


def reference_loglikelihood(model, doc, text, continuation) -> tuple[float, bool]:
    """Summed log-probability of ``continuation``'s tokens after the prompt, from the full forward pass."""
    proc = model.processor()
    item = prompt_item(model, doc, text)
    tokens = torch.tensor(proc.tokenizer(continuation, add_special_tokens=False)["input_ids"])
    ids = torch.cat([item["input_ids"], tokens])
    full = {k: v for k, v in item.items() if k not in ("prompt", "references")}
    full.update(input_ids=ids, labels=ids.clone())
    with torch.no_grad():
        logits = model(collate([full], proc.tokenizer.pad_token_id))[0]  # [L, V]
    logprobs = torch.log_softmax(logits[len(ids) - len(tokens) - 1 : -1], dim=-1)  # predicting each token
    return logprobs.gather(1, tokens[:, None]).sum().item(), bool((logprobs.argmax(-1) == tokens).all())


def test_registered_as_an_lmms_eval_simple_model():
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("lit_mllm") is LitMLLM  # lmms-eval checks the lmms subclass and is_simple
    assert issubclass(LitMLLM, lmms) and LitMLLM.is_simple


def test_generate_until_equals_the_module_one_prompt_at_a_time(model):
    greedy = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    expected = [reference_reply(model, doc, doc["question"], max_new_tokens=6) for doc in DOCS]
    assert all(len(e) >= 4 for e in expected), expected  # the stop-string case below needs some text
    stop = expected[1][2:4]
    requests = [
        request("generate_until", 0, dict(greedy)),
        request("generate_until", 1, {**greedy, "until": [stop, "never"]}),
        request("generate_until", 2, dict(greedy)),
        request(
            "generate_until", 1, dict(greedy), context="<image>\nIs the square green?"
        ),  # placed by the task
    ]
    model.train()
    replies = adapter(model, batch_size=2).generate_until(requests)
    assert model.training  # the module's mode is restored (in-training evaluation)
    assert replies == [expected[0], expected[1][: expected[1].find(stop)].strip(), expected[2], expected[1]]
    assert adapter(model, batch_size=1).generate_until(requests[:1]) == expected[:1]


def test_loglikelihood_sums_the_continuation_tokens(model):
    proc = model.processor()
    prompt = prompt_item(model, DOCS[0], DOCS[0]["question"])
    with torch.no_grad():
        batch = collate([prompt], proc.tokenizer.pad_token_id, padding_side="left")
        greedy_token = model(batch)[0, -1].argmax().item()
    greedy_text = proc.tokenizer.decode([greedy_token])
    assert proc.tokenizer(greedy_text, add_special_tokens=False)["input_ids"] == [greedy_token]
    cases = [(0, " yes"), (1, "No, it is not"), (0, greedy_text)]
    requests = [request("loglikelihood", d, c) for d, c in cases]
    results = adapter(model, batch_size=2).loglikelihood(requests)
    expected = [reference_loglikelihood(model, DOCS[d], DOCS[d]["question"], c) for d, c in cases]
    for (got, got_greedy), (want, want_greedy) in zip(results, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4) and got < 0
        assert got_greedy == want_greedy
    assert results[2][1] is True  # the model's own next token is its greedy continuation
    assert results[1][0] < results[0][0]  # more tokens, lower probability


def test_loglikelihood_reads_a_callable_target(model):
    def target(doc):  # a task's doc_to_target
        return f" {doc['colour']}"

    got = adapter(model).loglikelihood([request("loglikelihood", 2, target)])[0][0]
    assert got == pytest.approx(
        reference_loglikelihood(model, DOCS[2], DOCS[2]["question"], " blue")[0], rel=1e-4
    )


def test_unsupported_requests_are_refused_clearly(model):
    lm = adapter(model)
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    video = Instance(
        "generate_until",
        ("Describe.", {}, lambda doc: ["clip.mp4"], 0, "toy", "test"),
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(ValueError, match=r"task 'toy' split 'test' doc 0: .*not video or audio"):
        lm.generate_until([video])
    two = request("generate_until", 0, {}, context="<image> <image> Same?")
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) for 1 image"):
        lm.generate_until([two])
    with pytest.raises(ValueError, match="exactly one"):
        LitMLLM()
    with pytest.raises(ValueError, match="'auto' is not supported"):
        LitMLLM(model, batch_size="auto")


def test_built_from_a_run_config_and_checkpoint(model, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "seed_everything: 3\ntrainer: {max_steps: 1}\n"
        "model:\n  class_path: lit_mllm.lit.PrefixFusionVLM\n  init_args:\n"
        "    vision_tower: {class_path: lit_mllm.nn.vision.TinyCLIPVision, init_args: {image_size: 32, patch_size: 8,"
        " hidden_size: 32, num_layers: 2, num_heads: 2}}\n"
        "    language_model: {class_path: lit_mllm.nn.language.TinyLlama, init_args: {hidden_size: 64, num_layers: 2,"
        " num_heads: 4, num_kv_heads: 2}}\n"
    )
    torch.save({"state_dict": model.state_dict()}, tmp_path / "last.ckpt")
    built = LitMLLM(config=str(config), ckpt_path=str(tmp_path / "last.ckpt"), device="cpu")
    built.task_dict = {"toy": {"test": DOCS}}
    requests = [request("generate_until", k, {"max_new_tokens": 5}) for k in range(3)]
    assert built.generate_until(requests) == adapter(model).generate_until(requests)
    assert not built.module.training


def write_task(folder, data, name: str, body: str) -> None:
    """A task YAML as lmms-eval's own tasks are written (``!function`` hooks in a utils module beside it), reading
    ``data`` (JSON lines) through ``datasets`` with its cache in ``folder``."""
    utils = folder / "toy_utils.py"
    if not utils.exists():
        utils.write_text(
            "from PIL import Image\n"
            f"COLOURS = {COLOURS!r}\n"
            "def doc_to_visual(doc):\n    return [Image.new('RGB', (32, 32), COLOURS[doc['colour']])]\n"
            "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n"
        )
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: {data}}}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\ndoc_to_visual: !function toy_utils.doc_to_visual\n"
        "doc_to_text: !function toy_utils.doc_to_text\n" + body
    )


def evaluate(model, tmp_path, name: str, body: str) -> dict:
    """lmms-eval's ``simple_evaluate`` of the adapter on one task written into ``tmp_path``, offline."""
    import json

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({**doc, "answer": "Yes"}) + "\n" for doc in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, data, name, body)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return simple_evaluate(
        model=LitMLLM(model, batch_size=2),
        tasks=[name],
        task_manager=manager,
        log_samples=True,
        process_docs_parallel=1,
    )


@pytest.mark.slow
def test_lmms_eval_evaluator_runs_a_generation_task(model, tmp_path):
    out = evaluate(
        model,
        tmp_path,
        "toy_gen",
        "doc_to_target: answer\noutput_type: generate_until\n"
        "generation_kwargs: {max_new_tokens: 6, temperature: 0, do_sample: false}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n",
    )
    generated = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["toy_gen"]}
    expected = [reference_reply(model, doc, doc["question"], max_new_tokens=6) for doc in DOCS]
    assert generated == dict(enumerate(expected))
    assert out["results"]["toy_gen"]["exact_match,none"] == sum(e == "Yes" for e in expected) / len(DOCS)


@pytest.mark.slow
def test_lmms_eval_evaluator_runs_a_multiple_choice_task(model, tmp_path):
    from lmms_eval.api.instance import unwrap_generation_output

    if unwrap_generation_output((-1.5, True))[0] != (-1.5, True):
        pytest.skip(
            "this lmms-eval's evaluator turns a model's loglikelihood result (float, bool) into its string "
            "(lmms_eval.api.instance.unwrap_generation_output), so no multiple-choice task can run on a simple model"
        )
    out = evaluate(
        model,
        tmp_path,
        "toy_choice",
        "doc_to_target: 0\noutput_type: multiple_choice\ndoc_to_choice: [' yes', ' no']\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n",
    )
    scored = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["toy_choice"]}
    for k, doc in enumerate(DOCS):
        want = [reference_loglikelihood(model, doc, doc["question"], c)[0] for c in (" yes", " no")]
        assert scored[k] == pytest.approx(want, rel=1e-4)
