"""The real entry point: quickstart under fast_dev_run, a short run that leaves a run folder with the resolved
config and split/name metrics, then validate / test / predict from its checkpoint; help texts."""

import json
from pathlib import Path

import pytest
import yaml

from lit_mllm.cli import COMMANDS, main, run
from tests.conftest import cli_args

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def small(root, out) -> list[str]:
    return ["--config", QUICKSTART, *cli_args(root, out)]


def test_quickstart_fast_dev_run_generates_its_data(tmp_path):
    root = tmp_path / "sw"
    run(
        [
            "fit",
            *small(root, tmp_path),
            "--trainer.fast_dev_run",
            "2",
            "--data.init_args.generate_if_missing.init_args.num_train",
            "8",
            "--data.init_args.generate_if_missing.init_args.num_val",
            "4",
            "--data.init_args.generate_if_missing.init_args.num_test",
            "4",
        ]
    )
    assert (root / "train.json").is_file() and (root / "shapesworld.json").is_file()


def scalars(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_run_folder_then_validate_test_predict(tmp_path, shapes_root):
    cli = run(
        [
            "fit",
            *small(shapes_root, tmp_path),
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_val_batches",
            "2",
        ]
    )
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir.parent.name == "quickstart"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["init_args"]["connector"]["class_path"] == "lit_mllm.nn.connectors.MLPConnector"
    tags = scalars(run_dir)
    assert {"train/loss", "val/loss", "val/accuracy", "val/baseline/majority", "val/baseline/blind"} <= tags
    ckpt = next(run_dir.glob("checkpoints/*.ckpt"))

    run(["validate", *small(shapes_root, tmp_path), "--ckpt_path", str(ckpt)])
    test = run(["test", *small(shapes_root, tmp_path), "--ckpt_path", str(ckpt)])
    assert "test/accuracy" in test.trainer.callback_metrics
    pred = run(
        [
            "predict",
            *small(shapes_root, tmp_path),
            "--ckpt_path",
            str(ckpt),
            "--model.init_args.generation.max_new_tokens",
            "4",
        ]
    )
    rows = [
        json.loads(line)
        for line in (Path(pred.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    ]
    expected = json.loads((shapes_root / "test.json").read_text())
    assert [r["id"] for r in rows] == [r["id"] for r in expected]
    assert [r["references"] for r in rows] == [[r["conversations"][-1]["value"]] for r in expected]
    assert all(isinstance(r["answer"], str) and r["answer"] == r["answer"].strip() for r in rows)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--help"], "lit-mllm data shapesworld"),
        (["--help"], "lit-mllm validate-data --config FILE"),
        (["--help"], "lit-mllm estimate-memory --config FILE"),
        (["fit", "--help"], "--model"),
        (["fit", "--model.help", "lit_mllm.lit.PrefixFusionVLM"], "Connector class and its options"),
        (
            [
                "fit",
                "--model",
                "lit_mllm.lit.PrefixFusionVLM",
                "--model.init_args.language_model.help",
                "lit_mllm.nn.language.TinyLlama",
            ],
            "Context length in tokens",
        ),
        (["data", "shapesworld", "--help"], "Side of the smallest objects in pixels"),
    ],
)
def test_help_explains_itself(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(args)
    assert exit_.value.code == 0
    assert expected in " ".join(capsys.readouterr().out.split())  # help text is re-wrapped to the terminal


def test_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    expected = {
        "fit",
        "validate",
        "test",
        "predict",
        "describe",
        "validate-data",
        "estimate-memory",
        "export",
        "evaluate",
        "score-data",
        "soup",
    }
    assert expected | {"data", "sweep", "report"} == set(COMMANDS)
    for name, command in COMMANDS.items():
        assert f"lit-mllm {name} {command.usage}\n      {command.summary}\n" in out


def test_no_command_prints_the_table_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_:
        run([])
    assert exit_.value.code == 2
    assert "lit-mllm estimate-memory --config FILE" in capsys.readouterr().err


@pytest.mark.parametrize("name,close", [("fti", "fit"), ("valdate-data", "validate-data"), ("zzz", None)])
def test_unknown_command_says_so_and_lists_the_commands(name, close, capsys):
    with pytest.raises(SystemExit) as exit_:
        run([name, "--config", QUICKSTART])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown command {name!r}" in err
    assert ("did you mean" not in err) if close is None else (f"did you mean {close!r}" in err)
    assert ", ".join(COMMANDS) in err  # every command, in the table's order


def test_every_command_module_has_a_main():
    import importlib
    import inspect

    for name, command in COMMANDS.items():
        main = importlib.import_module(command.module).main
        assert list(inspect.signature(main).parameters) == ["args"], name


def test_unknown_class_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                *small(tmp_path / "sw", tmp_path),
                "--model.init_args.connector",
                "lit_mllm.nn.connectors.NoSuch",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "lit-mllm fit: config error: model.init_args.connector (from the flag --model.init_args.connector "
        "lit_mllm.nn.connectors.NoSuch):"
    )
    assert "module 'lit_mllm.nn.connectors' has no attribute 'NoSuch'" in err
    assert "Given value" not in err and "Traceback" not in err


def test_typo_in_a_config_file_and_on_the_command_line(tmp_path, capsys):
    """A mistyped key: the message names the file (or flag) it came from and the nearest valid key; exit 2, no
    stack trace (``main`` is the ``lit-mllm`` console script)."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path(QUICKSTART).read_text().replace("max_epochs: 4", "max_epoch: 4"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(typo), *cli_args(tmp_path / "sw", tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"lit-mllm fit: config error: trainer.max_epoch is not an option of trainer (from {typo}); "
        "did you mean max_epochs?\n"
    )
    assert "Traceback" not in err and "usage:" not in err

    with pytest.raises(SystemExit) as exit_:
        main(["fit", *small(tmp_path / "sw", tmp_path), "--data.init_args.batch_sise", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "lit-mllm fit: config error: data.batch_sise is not an option of MixtureData (from the flag "
        "--data.init_args.batch_sise 4); did you mean batch_size?\n"
        "`--data.help lit_mllm.data.MixtureData` lists MixtureData's options\n"
    )
    assert "Traceback" not in err


def test_missing_data_file_is_one_message(tmp_path, shapes_root, capsys):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("val.json", "test.json", "shapesworld.json"):
        (root / name).write_text((shapes_root / name).read_text())
    (root / "images").symlink_to(shapes_root / "images")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *small(root, tmp_path), "--trainer.fast_dev_run", "1"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "lit-mllm fit: data error: data.train.shapesworld (Conversations) cannot be opened: "
    )
    assert f"{root / 'train.json'}: no such file" in err  # the split, the source and the file
    assert "Traceback" not in err and "lit-mllm --debug fit" in err


@pytest.mark.slow
def test_console_script_prints_a_typo_without_a_stack_trace(tmp_path):
    """The same as a shell command (``python -m lit_mllm``), with and without ``--debug`` (two interpreters
    starting: ~10 s each on a busy machine, hence slow)."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "lit_mllm",
        "fit",
        *small(tmp_path / "sw", tmp_path),
        "--trainer.max_epohcs",
        "3",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(
        "lit-mllm fit: config error: trainer.max_epohcs is not an option of trainer (from the flag "
        "--trainer.max_epohcs 3); did you mean max_epochs?"
    )
    assert "Traceback" not in done.stderr
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "ConfigError: trainer.max_epohcs is not an option of trainer" in debug.stderr


def test_describe_reports_tokens_and_connector_flops(tmp_path, capsys):
    facts = run(["describe", "--config", QUICKSTART, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert facts["image_tokens"] == 64  # (64 px / 8 px)^2 patches, CLS dropped, MLP keeps every token
    # MLP connector 64 -> 128 -> 128 on 64 tokens: 2 * (64*128 + 128*128) * 64 multiply-adds counted as FLOPs
    assert facts["connector_flops_per_image"] == 2 * (64 * 128 + 128 * 128) * 64
    assert facts["params/connector"] == (64 * 128 + 128) + (128 * 128 + 128)
    out = capsys.readouterr().out
    assert "connector_flops_per_image" in out and "language_model" in out


def test_console_script_exits_zero(tmp_path):
    """`lit-mllm ...` as a shell command: success is exit status 0 (the entry point must not return an object)."""
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from lit_mllm.cli import main; sys.exit(main())",
            "data",
            "shapesworld",
            "--out",
            str(tmp_path / "sw"),
            "--generator.num_train",
            "2",
            "--generator.num_val",
            "1",
            "--generator.num_test",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "object at 0x" not in done.stdout


def test_checkpoint_holds_trainable_weights_only(tmp_path, shapes_root):
    """Align stage: the checkpoint has the connector's weights and nothing frozen; validate reloads it, and a
    stage that trains more refuses it by name."""
    import torch

    align = str(Path(__file__).resolve().parents[1] / "configs" / "stage" / "align.yaml")
    cli = run(
        [
            "fit",
            *small(shapes_root, tmp_path),
            "--model.init_args.stage",
            align,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    ckpt = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert set(saved["state_dict"]) == {f"connector.{n}" for n, _ in cli.model.connector.named_parameters()}
    assert saved["lit_mllm"]["stage"] == "align" and saved["optimizer_states"]

    validated = run(
        [
            "validate",
            *small(shapes_root, tmp_path),
            "--model.init_args.stage",
            align,
            "--ckpt_path",
            str(ckpt),
        ]
    )
    for name, p in validated.model.connector.named_parameters():
        assert torch.equal(p, saved["state_dict"][f"connector.{name}"])
    # without --model.init_args.stage the CLI takes the stage from the checkpoint's hyperparameters
    again = run(["validate", *small(shapes_root, tmp_path), "--ckpt_path", str(ckpt)])
    assert again.model.stage.trainable == ["connector"]
    from tests.conftest import tiny_model

    with pytest.raises(
        KeyError, match="lacks .* weights that stage 'finetune' trains .* saved by stage 'align'"
    ):
        tiny_model().on_load_checkpoint(saved)


FLAMINGO = str(Path(__file__).resolve().parents[1] / "configs" / "model" / "flamingo.yaml")


@pytest.mark.parametrize(
    "command,label",
    [("estimate-memory", "estimate covers the prefix family"), ("export", "is not a PrefixFusionVLM")],
)
def test_a_model_a_command_does_not_support_is_one_message(command, label, tmp_path, capsys):
    """The memory estimate and the LLaVA export of a Flamingo model: what they support, without a stack trace."""
    args = [command, "--config", QUICKSTART, "--config", FLAMINGO]
    args += ["--out", str(tmp_path / "out")] if command == "export" else []
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lit-mllm {command}: not supported: ") and label in err
    assert "Traceback" not in err
