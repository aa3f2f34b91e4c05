"""What the console shows: errors a person can act on as one message (and bugs with their stack trace), errors
from DataLoader workers as the worker raised them, config errors built from jsonargparse's messages, and a quiet
run (no Lightning model summary or cloud tips, no ``v_num``, plain progress lines when stdout is no terminal,
learning-rate curves named by part)."""

from __future__ import annotations

import logging
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from lit_mllm import cli
from lit_mllm.cli import COMMANDS, Command, error_message, report
from lit_mllm.commands.config_errors import ConfigError, clean, nearest, unknown_key, where
from lit_mllm.commands.lightning import build_cli, note_arguments
from lit_mllm.data.sample import DataError
from lit_mllm.training import Stage
from lit_mllm.training.callbacks import ProgressLines, TerminalProgressBar, console_progress_bar
from lit_mllm.training.checkpoints import UnsafeCheckpoint, WeightsMismatch
from lit_mllm.training.stages import param_groups
from tests.conftest import Record, cli_args, shapes_data, tiny_fit, tiny_model

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


class Lines(logging.Handler):
    """The messages a logger (and the loggers under it) emits while attached."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Lines:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


# -- errors a person can act on ----------------------------------------------------------------------------------
@pytest.fixture
def boom(monkeypatch):
    """A ``lit-mllm boom`` command that raises what the test sets: ``boom(error)``."""
    module = types.ModuleType("lit_mllm_test_boom")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, "boom", Command(module.__name__, "", "raises"))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def raising(error: BaseException) -> None:
        def command(args: list[str]) -> None:
            raise error

        module.main = command

    return raising


@pytest.mark.parametrize(
    "error,label,code",
    [
        (
            DataError("train.json record 3 (id 'a'): image file not found: x.png", "missing_file"),
            "data error",
            1,
        ),
        (
            WeightsMismatch("2 tensors in x.ckpt have another shape; use the config of the run"),
            "checkpoint error",
            1,
        ),
        (UnsafeCheckpoint("x.ckpt holds objects weights_only loading refuses"), "checkpoint error", 1),
        (FileNotFoundError("Checkpoint file not found: /runs/x.ckpt"), "missing file", 1),
        (ConfigError("trainer.max_epoch is not an option of trainer"), "config error", 2),
    ],
)
def test_errors_a_person_can_act_on_are_one_message_and_exit_non_zero(error, label, code, boom, capsys):
    boom(error)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["boom"])
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert err.startswith(f"lit-mllm boom: {label}: {error_message(error)}\n")
    assert "Traceback" not in err and "lit-mllm --debug boom" in err
    if isinstance(error, FileNotFoundError):
        assert "give --ckpt_path a checkpoint that exists" in err
    if isinstance(error, DataError):
        assert "lit-mllm validate-data --config FILE" in err


def test_debug_flag_and_variable_keep_the_stack_trace_and_bugs_always_do(boom, monkeypatch):
    boom(DataError("bad record"))
    with pytest.raises(DataError, match="bad record"):
        cli.main(["--debug", "boom"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(DataError, match="bad record"):
        cli.main(["boom"])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    with pytest.raises(SystemExit):
        cli.main(["boom"])
    boom(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):  # a bug: not reported as a message
        cli.main(["boom"])
    assert report(ZeroDivisionError("x"), "fit") is None and report(KeyError("x"), "fit") is None


class Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        if index == 2:
            raise DataError("shard.tar member 2 (id 'b'): not a readable image\n(fix or drop the record)")
        return torch.zeros(1)


def test_errors_from_dataloader_workers_arrive_as_the_worker_raised_them():
    loader = DataLoader(Broken(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert "Original Traceback" in str(
        caught.value
    )  # torch's wrapping: the worker's traceback in the message
    assert (
        error_message(caught.value)
        == "shard.tar member 2 (id 'b'): not a readable image\n(fix or drop the record)"
    )
    message, code = report(caught.value, "fit")
    assert "Traceback" not in message and code == 1


# -- config errors -------------------------------------------------------------------------------------------------
TOP = "Subcommand 'fit' does not accept option 'trainer.max_epoch'"
NESTED = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lit_mllm.lit.base.VLMModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lit_mllm.lit.PrefixFusionVLM':
        Parser key "vision_tower":
          Problem with given class_path 'lit_mllm.nn.vision.TinyCLIPVision':
            Option 'patch_sise' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'class_path': 'lit_mllm.lit.PrefixFusionVLM', 'init_args': {'vision_tower': {'patch_sise': 8}}}"""


def test_unknown_keys_are_read_from_jsonargparse_messages():
    top = unknown_key(TOP)
    assert (top.path, top.owner, top.level) == (("trainer", "max_epoch"), None, ("trainer",))
    nested = unknown_key(NESTED)
    assert nested.path == ("model", "init_args", "vision_tower", "init_args", "patch_sise")
    assert (nested.owner, nested.level) == ("lit_mllm.nn.vision.TinyCLIPVision", ())
    flag = unknown_key("unrecognized arguments: --trainer.max_epohcs 3")
    assert (flag.path, flag.level) == (("trainer", "max_epohcs"), ("trainer",))
    assert unknown_key("Parser key \"trainer.max_epochs\":\n  Expected a <class 'int'>") is None
    assert "Given value" not in clean(NESTED) and "Problem with given class_path" in clean(NESTED)


def test_nearest_keys():
    options = ["max_epochs", "min_epochs", "max_steps", "max_time", "accelerator"]
    assert nearest("max_epoch", options) == ["max_epochs"]
    assert nearest("max_epohcs", options)[0] == "max_epochs"
    assert nearest("zzz", options) == []


def test_where_a_key_was_set(tmp_path):
    sub = tmp_path / "tower.yaml"
    sub.write_text("class_path: lit_mllm.nn.vision.TinyCLIPVision\ninit_args: {patch_sise: 8}\n")
    main_file = tmp_path / "run.yaml"
    main_file.write_text("trainer: {max_epoch: 2}\nmodel:\n  init_args:\n    vision_tower: tower.yaml\n")
    args = ["fit", "--config", str(main_file), "--trainer.max_epoch", "3"]
    assert where(("trainer", "max_epoch"), args) == ["the flag --trainer.max_epoch 3", str(main_file)]
    tower = ("model", "init_args", "vision_tower", "init_args", "patch_sise")
    assert where(tower, args) == [str(sub)]
    assert where(("model", "init_args", "connector"), args) == []


def test_typo_in_a_config_file_names_the_file_and_the_nearest_keys(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path(QUICKSTART).read_text().replace("patch_size: 8", "patch_sise: 8"))
    with pytest.raises(ConfigError) as caught:
        build_cli(["--config", str(typo), *cli_args(tmp_path / "sw", tmp_path)], run=False)
    message = str(caught.value)
    assert message.startswith(
        f"model.vision_tower.patch_sise is not an option of TinyCLIPVision (from {typo}); did you mean patch_size?"
    )
    assert "--model.init_args.vision_tower.help lit_mllm.nn.vision.TinyCLIPVision" in message
    assert "Given value" not in message


def test_a_value_the_class_refuses_names_the_class_and_the_flag(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_cli(
            [
                "--config",
                QUICKSTART,
                *cli_args(tmp_path / "sw", tmp_path),
                "--data.init_args.max_bad_fraction",
                "2",
            ],
            run=False,
        )
    assert str(caught.value) == (
        "while building MixtureData: max_bad_fraction must be in [0, 1], got 2.0\n"
        "(max_bad_fraction from the flag --data.init_args.max_bad_fraction 2)"
    )
    assert isinstance(
        caught.value.__cause__, ValueError
    )  # --debug shows jsonargparse's error and the class's


# -- a quiet console -----------------------------------------------------------------------------------------------
def test_one_parameter_table_no_tips_and_the_progress_display_for_the_output(tmp_path, monkeypatch):
    args = ["--config", QUICKSTART, *cli_args(tmp_path / "sw", tmp_path)]
    with Lines("lightning.pytorch") as lines:
        trainer = build_cli(args, run=False).trainer
    assert not [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in trainer.callbacks if isinstance(c, ProgressBar)] == [
        ProgressLines
    ]  # no terminal
    assert any(m.startswith("GPU available") for m in lines.messages)  # the handler sees Lightning's lines
    assert not any("Tip" in m or "litlogger" in m for m in lines.messages)

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(console_progress_bar(), TerminalProgressBar)
    trainer = build_cli([*args, "--trainer.enable_progress_bar", "false"], run=False).trainer
    assert trainer.progress_bar_callback is None
    own = build_cli([*args, "--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"], run=False)
    assert [type(c) for c in own.trainer.callbacks if isinstance(c, ProgressBar)] == [TQDMProgressBar]


def test_arguments_from_python_are_noted_in_one_short_line_not_lightnings_warning(tmp_path):
    config_text = "model:\n  init_args:\n" + "".join(f"    option_{i}: {i}\n" for i in range(200))
    with Lines("lightning.pytorch") as lines:
        note_arguments(["fit", "--config", config_text], ["tests/test_console.py", "-q"])
        note_arguments(["describe", "--config", "a.yaml"], ["describe", "--config", "a.yaml"])
        note_arguments(["--config", "a.yaml"], ["describe", "--config", "a.yaml"])
    assert len(lines.messages) == 1
    (line,) = lines.messages
    assert len(line) < 300 and "\n" not in line
    assert "given: fit --config model:   init_args:" in line
    assert line.endswith("ignored from the command line: tests/test_console.py -q")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(["--config", QUICKSTART, *cli_args(tmp_path / "sw", tmp_path)], run=False)
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]


def test_terminal_bar_has_no_v_num(shapes_root, tmp_path):
    bar = TerminalProgressBar()
    model = tiny_model()
    data = shapes_data(shapes_root, batch_size=4)
    data.connect(model.processor())
    trainer = tiny_fit(
        model,
        data,
        max_steps=2,
        callbacks=[bar],
        enable_progress_bar=True,
        logger=TensorBoardLogger(tmp_path),
    )
    shown = bar.get_metrics(trainer, model)
    assert "train/loss" in shown and "v_num" not in shown
    assert "v_num" in TQDMProgressBar.get_metrics(bar, trainer, model)  # what Lightning's own bar would show


def test_progress_lines_every_n_steps_with_loss_throughput_and_eta(shapes_root, capsys):
    record = Record()
    model = tiny_model()
    data = shapes_data(shapes_root, batch_size=4)
    data.connect(model.processor())
    tiny_fit(
        model,
        data,
        max_steps=4,
        callbacks=[ProgressLines(every_n_steps=2), record],
        enable_progress_bar=True,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
    )
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    pattern = (
        r"step (\d)/4 \(epoch 0\) \| train/loss (\d+\.\d{3}) \| \d+\.\d samples/s \| ETA (\d+:\d\d:\d\d)"
    )
    matched = [re.fullmatch(pattern, line) for line in steps]
    assert all(matched) and [m.group(1) for m in matched] == ["2", "4"], steps
    assert [float(m.group(2)) for m in matched] == [round(record.losses[i], 3) for i in (1, 3)]
    assert matched[-1].group(3) == "0:00:00"
    vals = [line for line in lines if line.startswith("validation at step")]
    assert [v.split(" | ")[0] for v in vals] == ["validation at step 2", "validation at step 4"]
    assert all(re.search(r"\| val/loss \d+\.\d{3}", v) for v in vals)
    assert lines[-1].startswith("training ended at step 4 after ")


def test_learning_rate_curves_are_named_by_part_and_decay_group(shapes_root, tmp_path):
    stage = Stage("all", ["vision_tower", "connector", "language_model"])
    model = tiny_model(stage)
    groups = param_groups(model.parts(), stage)
    assert {(g["part"], g["name"], "weight_decay" in g) for g in groups} == {
        (part, name, no_decay)
        for part in ("vision_tower", "connector", "language_model")
        for name, no_decay in ((part, False), (f"{part}/no_decay", True))
    }
    monitor = LearningRateMonitor()
    data = shapes_data(shapes_root, batch_size=4)
    data.connect(model.processor())
    tiny_fit(model, data, max_steps=1, callbacks=[monitor], logger=CSVLogger(tmp_path))
    assert set(monitor.lrs) == {
        f"lr-AdamW/{part}{suffix}"
        for part in ("vision_tower", "connector", "language_model")
        for suffix in ("", "/no_decay")
    }


def test_checkpoint_hyperparameters_that_do_not_parse_are_a_config_error(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {"no_such_option": 1}}, ckpt)
    with pytest.raises(ConfigError) as caught:
        build_cli(
            [
                "validate",
                "--config",
                QUICKSTART,
                *cli_args(tmp_path / "sw", tmp_path),
                "--ckpt_path",
                str(ckpt),
            ]
        )
    assert str(caught.value).startswith(f"the model's hyperparameters saved in {ckpt} do not fit")
    assert "no_such_option" in str(caught.value)
