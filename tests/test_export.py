"""Export: loading trained weights into a model built from its config, the LLaVA (transformers) folder and the
plain safetensors + config export.

The LLaVA folder is checked against transformers itself: ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` on the written folder must give our logits, token ids and pixels."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from lit_mllm.commands.export import main as export_main
from lit_mllm.data import Sample, collate, read_llava
from lit_mllm.data.images import normalize
from lit_mllm.data.layouts import AnyRes, Letterbox, Resize, ResizeCrop
from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.nn.connectors import AvgPoolConnector, LinearConnector, MLPConnector
from lit_mllm.nn.language import TinyLlama, TinyQwen2, Turn, VicunaV1
from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR
from lit_mllm.nn.vision import HFVisionTower, TinyCLIPVision
from lit_mllm.training import Stage
from lit_mllm.training.checkpoints import WeightsMismatch, load_weights
from lit_mllm.training.export import (
    UnsupportedExport,
    export_llava,
    export_safetensors,
    vicuna_chat_template,
)

LMS = {
    "llama": lambda: TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    "qwen2": lambda: TinyQwen2(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
}


def clip(**kw) -> TinyCLIPVision:
    return TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, **kw)


def build(tower=clip, lm="llama", connector=MLPConnector, seed=0, **kw) -> PrefixFusionVLM:
    torch.manual_seed(seed)
    return PrefixFusionVLM(tower(), LMS[lm](), connector=connector, **kw).eval()


def scramble(model) -> None:
    """Random tiny inits give near-zero logits; scale every weight so a mapping error could not hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)


def batch_of(model, shapes_root, n=3) -> dict:
    """``n`` ShapesWorld samples with an image each, plus one text-only sample."""
    proc = model.processor()
    samples = read_llava(shapes_root / "train.json")[:n]
    samples.append(Sample("text-only", [Turn("user", "How many circles?"), Turn("assistant", "two")]))
    return collate([proc(s) for s in samples], pad_token_id=proc.tokenizer.pad_token_id)


def assert_same_logits(model, llava, batch) -> None:
    with torch.no_grad():
        ours = model(batch)
        theirs = llava(
            input_ids=batch.input_ids,
            pixel_values=normalize(batch.pixel_values, model.vision_tower.mean, model.vision_tower.std),
            attention_mask=batch.attention_mask,
        ).logits
    mask = batch.attention_mask.bool()
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs[mask], ours[mask], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip")
    config = SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
    )
    SiglipVisionModel(config).save_pretrained(path)
    return path


# -- LLaVA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_llava_folder_gives_our_logits(tmp_path, shapes_root, lm):
    model = build(lm=lm)
    scramble(model)
    out = export_llava(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert llava.config.image_token_id == model.language_model.image_token_id
    assert llava.config.image_seq_length == model.tokens_per_image == 16
    assert llava.config.vision_feature_select_strategy == "default"  # CLS dropped
    assert llava.config.text_config.model_type == lm
    tied = llava.get_output_embeddings().weight.data_ptr() == llava.get_input_embeddings().weight.data_ptr()
    assert tied == (lm == "qwen2")  # TinyQwen2 ties its embeddings, TinyLlama does not
    assert_same_logits(model, llava, batch_of(model, shapes_root))


@pytest.mark.parametrize("which", ["siglip", "clip_keep_cls"])
def test_llava_folder_other_towers(tmp_path, shapes_root, siglip_dir, which):
    if which == "siglip":  # no CLS token: LLaVA must keep every token ("full"), not drop the first patch
        model = build(tower=lambda: HFVisionTower(str(siglip_dir), feature_layer=-2))
        tokens = 16
    else:
        model = build(tower=lambda: clip(keep_cls=True))
        tokens = 17
    scramble(model)
    out = export_llava(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert llava.config.vision_feature_select_strategy == "full"
    assert model.tokens_per_image == tokens
    assert_same_logits(model, llava, batch_of(model, shapes_root))
    processor = AutoProcessor.from_pretrained(out)
    image = Image.new("RGB", (32, 32))
    ids = processor(images=image, text="<image>", return_tensors="pt")["input_ids"]
    assert int((ids == model.language_model.image_token_id).sum()) == tokens


@pytest.mark.parametrize("layout", [Resize(), ResizeCrop(), Letterbox(), Resize(resampler="pil")], ids=repr)
def test_processor_folder_prepares_inputs_as_we_do(tmp_path, shapes_root, layout):
    """From a raw non-square image and a question, the exported processor (chat template, tokenizer, image
    processor) gives our token ids and pixels, and the exported model our logits; the processor is loaded with the
    backend that resamples as the layout does (torchvision by default, PIL for ``resampler="pil"``)."""
    model = build(image_layout=layout)
    scramble(model)
    out = export_llava(model, tmp_path / "llava")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.language_model.image_token_id

    source = read_llava(shapes_root / "train.json")[0]
    image = Image.open(source.images[0]).convert("RGB").resize((48, 37))
    image.save(tmp_path / "image.png")
    question = "What colour is the circle?"
    sample = Sample(
        "q", [Turn("user", f"<image>\n{question}"), Turn("assistant", "red")], [str(tmp_path / "image.png")]
    )
    ours = collate([model.processor()(sample, for_generation=True)], pad_token_id=tokenizer.pad_token_id)

    processor = AutoProcessor.from_pretrained(
        out, **({"backend": "pil"} if layout.resampler == "pil" else {})
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(images=Image.open(tmp_path / "image.png"), text=text, return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours.input_ids.tolist()
    pixels = normalize(ours.pixel_values, model.vision_tower.mean, model.vision_tower.std)
    torch.testing.assert_close(theirs["pixel_values"], pixels, rtol=0, atol=1e-6)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert_same_logits(model, llava, ours)


def test_two_image_prompt_keeps_each_image_where_it_is_in_the_list(tmp_path, shapes_root):
    """The usual list content ``[image, text, image, text]`` through the exported chat template and processor gives
    the ids and pixels of the training record ``<image>\\nA<image>\\nB`` (each image before its own text)."""
    model = build()
    scramble(model)
    out = export_llava(model, tmp_path / "llava")
    paths = [read_llava(shapes_root / "train.json")[k].images[0] for k in (0, 1)]
    first, second = "What is in the first image?", "And in this one?"
    sample = Sample(
        "two",
        [Turn("user", f"<image>\n{first}<image>\n{second}"), Turn("assistant", "shapes")],
        paths,
    )
    processor = AutoProcessor.from_pretrained(out)  # the default backend resamples as the default layout
    ours = collate(
        [model.processor()(sample, for_generation=True)], pad_token_id=processor.tokenizer.pad_token_id
    )

    content = [
        {"type": "image"},
        {"type": "text", "text": first},
        {"type": "image"},
        {"type": "text", "text": second},
    ]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert text.count("<image>") == 2
    assert (
        text.index(first) < text.rindex("<image>") < text.index(second)
    )  # the second image after the first text
    theirs = processor(images=[Image.open(p) for p in paths], text=text, return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours.input_ids.tolist()
    pixels = normalize(ours.pixel_values, model.vision_tower.mean, model.vision_tower.std)
    assert not torch.equal(pixels[0], pixels[1])  # two different images, so their order is checked too
    torch.testing.assert_close(theirs["pixel_values"], pixels, rtol=0, atol=1e-6)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert_same_logits(model, llava, ours)


def test_chat_template_leaves_bos_to_a_tokenizer_that_adds_it(tmp_path):
    from tokenizers.processors import TemplateProcessing

    model = build()
    tok = model.language_model.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    out = export_llava(model, tmp_path / "llava")
    processor = AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = processor(text=text)["input_ids"][0]
    turns = [Turn("user", "Hi")]
    assert ids.count(tok.bos_token_id) == 1
    assert ids == tok(VicunaV1().render(turns, tok, True).text, add_special_tokens=False)["input_ids"]


@functools.cache
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    system=names,
    user=names,
    assistant=names,
    texts=st.lists(names, min_size=1, max_size=5),
    with_system=st.booleans(),
)
def test_vicuna_chat_template_renders_like_vicuna(system, user, assistant, texts, with_system):
    tok = tiny_tokenizer()
    fmt = VicunaV1(system=system, user=user, assistant=assistant)
    template = vicuna_chat_template(fmt, "<image>", bos=True)
    roles = ["user", "assistant"] * len(texts)
    turns = [Turn(role, text) for role, text in zip(roles, texts)]
    if with_system:
        turns = [Turn("system", "Be brief.\n")] + turns
    generation = turns[-1].role == "user"
    messages = [{"role": t.role, "content": t.text} for t in turns]
    rendered = tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )
    assert rendered == fmt.render(turns, tok, add_generation_prompt=generation).text


items = st.lists(st.one_of(st.just(None), names), min_size=1, max_size=6)  # None: an image


@settings(max_examples=40, deadline=None)
@given(contents=st.lists(items, min_size=1, max_size=3))
def test_vicuna_chat_template_keeps_list_items_in_order(contents):
    """List contents render item by item (an image as ``<image>\\n``), like the turn text a record has."""
    tok = tiny_tokenizer()
    fmt = VicunaV1()
    template = vicuna_chat_template(fmt, "<image>", bos=True)
    messages, turns = [], []
    for k, content in enumerate(contents):
        role = ["user", "assistant"][k % 2]
        listed = [{"type": "image"} if c is None else {"type": "text", "text": c} for c in content]
        messages.append({"role": role, "content": listed})
        turns.append(Turn(role, "".join("<image>\n" if c is None else c for c in content)))
    generation = turns[-1].role == "user"
    rendered = tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )
    assert rendered == fmt.render(turns, tok, add_generation_prompt=generation).text


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"connector": LinearConnector}, "LinearConnector is a single linear layer"),
        ({"connector": lambda i, o: MLPConnector(i, o, depth=1)}, "MLPConnector is a single linear layer"),
        ({"connector": lambda i, o: MLPConnector(i, o, depth=3)}, r"MLPConnector\(depth=3\)"),
        ({"connector": lambda i, o: MLPConnector(i, o, hidden_dim=32)}, "hidden_dim=32"),
        ({"connector": lambda i, o: AvgPoolConnector(i, o, out_tokens=4)}, "connector AvgPoolConnector"),
        ({"image_layout": AnyRes()}, "image layout AnyRes"),
        ({"image_layout": Letterbox(fill=(0, 0, 0))}, r"LLaVA pads with the tower's mean, \(122, 116, 104\)"),
    ],
)
def test_llava_refuses_what_it_cannot_express(tmp_path, kwargs, named):
    model = build(**kwargs)
    with pytest.raises(UnsupportedExport, match=named) as err:
        export_llava(model, tmp_path / "llava")
    assert "--format safetensors" in str(err.value)
    assert not (tmp_path / "llava").exists()


def test_llava_refuses_other_towers(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(
        Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    ).save_pretrained(tmp_path / "dino")
    model = build(tower=lambda: HFVisionTower(str(tmp_path / "dino")))
    with pytest.raises(
        UnsupportedExport,
        match=r"vision tower HFVisionTower \(dinov2\).*CLIP or SigLIP.*--format safetensors",
    ):
        export_llava(model, tmp_path / "llava")


# -- load_weights -----------------------------------------------------------------------------------------------
def lightning_checkpoint(model, path) -> None:
    """Save ``model`` the way a run does (Trainer.save_checkpoint: on_save_checkpoint keeps trainable weights)."""
    import lightning as L

    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


def test_lightning_checkpoint_round_trip(tmp_path):
    stage = Stage("align", ["connector"])
    trained = build(stage=stage)
    with torch.no_grad():
        for p in trained.connector.parameters():
            p.add_(torch.randn_like(p))
    lightning_checkpoint(trained, tmp_path / "run.ckpt")

    fresh = build(stage=stage)  # the config rebuilds the same frozen parts (same sources: here, the seed)
    assert not torch.equal(fresh.connector.linear_1.weight, trained.connector.linear_1.weight)
    report = load_weights(fresh, tmp_path / "run.ckpt")
    assert report.stage == "align"
    assert set(report.missing) == {k for k in trained.state_dict() if not k.startswith("connector.")}
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)

    other = build(stage=stage, seed=1)  # tensors the checkpoint lacks keep the values the config built
    tower = {k: v.clone() for k, v in other.vision_tower.state_dict().items()}
    load_weights(other, tmp_path / "run.ckpt")
    for key, value in other.vision_tower.state_dict().items():
        assert torch.equal(value, tower[key]), key
    torch.testing.assert_close(other.connector.state_dict(), trained.connector.state_dict(), rtol=0, atol=0)


def test_safetensors_export_round_trip_with_tied_weights(tmp_path):
    model = build(lm="qwen2")
    config = {"model": {"class_path": "lit_mllm.lit.PrefixFusionVLM", "init_args": {"max_new_tokens": 4}}}
    out = export_safetensors(model, config, tmp_path / "export")
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["model"]["init_args"] == {
        "max_new_tokens": 4,
        "init_from": str((out / "model.safetensors").resolve()),
    }

    fresh = build(lm="qwen2", seed=1)
    report = load_weights(fresh, written["model"]["init_args"]["init_from"])
    assert report.missing == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    lm = fresh.language_model.model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # still tied


def test_unknown_checkpoint_keys_are_named(tmp_path):
    from safetensors.torch import save_file

    model = build()
    state = {k: v.clone() for k, v in model.connector.state_dict().items()}
    save_file(
        {f"connector.{k}": v for k, v in state.items()}
        | {"connectr.linear_1.weight": state["linear_1.weight"].clone()},
        tmp_path / "w.safetensors",
    )
    with pytest.raises(
        WeightsMismatch,
        match=r"1 of the 5 tensors .* \['connectr.linear_1.weight'\]; the closest name in the model is 'connector.linear_1.weight'",
    ):
        load_weights(model, tmp_path / "w.safetensors")

    save_file({"connector.linear_1.weight": torch.zeros(3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(
        WeightsMismatch, match=r"connector.linear_1.weight: file \(3, 3\) vs model \(64, 32\)"
    ):
        load_weights(model, tmp_path / "shape.safetensors")

    torch.save({"weights": {}}, tmp_path / "plain.pt")
    with pytest.raises(WeightsMismatch, match="not a Lightning checkpoint"):
        load_weights(model, tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(model, tmp_path / "absent.ckpt")


# -- the command --------------------------------------------------------------------------------------------------
def test_export_command_from_a_run_config_and_checkpoint(tmp_path, shapes_root):
    """What a user does after `lit-mllm fit`: the run's config.yaml (with the subcommand's keys) + a checkpoint."""
    from pathlib import Path

    from lit_mllm.commands.lightning import build_cli

    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    args = [
        "--config",
        quickstart,
        "--data.init_args.root",
        str(shapes_root),
        "--data.init_args.num_workers",
        "0",
    ]
    cli = build_cli(args, run=False)
    model = cli.model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    lightning_checkpoint(model, tmp_path / "run.ckpt")
    run_config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    run_config.update(ckpt_path=None, weights_only=None)  # as a fit run saves it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_config))

    common = ["--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "run.ckpt")]
    out = export_main([*common, "--out", str(tmp_path / "llava")])
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert_same_logits(model, llava, batch_of(model, shapes_root))

    out = export_main([*common, "--out", str(tmp_path / "st"), "--format", "safetensors"])
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["data"] == run_config["data"]
    rebuilt = build_cli(
        ["--config", str(out / "config.yaml")], run=False
    ).model  # init_from loads the weights
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, rtol=0, atol=0, msg=key)
