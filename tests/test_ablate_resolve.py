"""Every arm of a grid parsed by lit-mllm fit's parser before anything runs (lit_mllm/ablate/resolve.py): the
values reach the resolved config, a bad axis fails naming the arm, compute matching, the dry run's differences,
and the t-based statistics of the report (lit_mllm/ablate/stats.py) against printed tables."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_mllm.ablate.grid import GridError, grid_from_dict
from lit_mllm.ablate.resolve import describe_plans, differences, flatten, resolve_arms
from lit_mllm.ablate.stats import summarize, t_quantile, welch
from tests.ablate_grids import tiny_grid

KEYS = {  # real options of the quickstart's config and values they accept
    "model.init_args.connector.init_args.depth": st.integers(1, 3),
    "data.init_args.batch_size": st.integers(1, 8),
    "model.init_args.optimizer.init_args.lr": st.sampled_from([1e-3, 3e-4, 0.01]),
    "trainer.gradient_clip_val": st.sampled_from([0.5, 1.0, 2.0]),
}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_arm_parses_and_its_resolved_config_holds_its_values(data, shapes_root, tmp_path):
    keys = data.draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=2, unique=True))
    axes = {
        f"a{i}": {"key": key, "values": data.draw(st.lists(KEYS[key], min_size=1, max_size=2, unique=True))}
        for i, key in enumerate(keys)
    }
    grid = grid_from_dict(tiny_grid(shapes_root, tmp_path, axes=axes, seeds=[0, 1]))
    plans = resolve_arms(grid)
    assert len(plans) == 2 * math.prod(len(a["values"]) for a in axes.values())
    for plan in plans:
        flat = flatten(plan.config)
        for name, axis in axes.items():
            assert flat[axis["key"]] == plan.arm.values[name]
        assert flat["seed_everything"] == plan.arm.seed  # seeds of a condition: its parse with the seed set
        assert flat["trainer.max_steps"] == 3 and flat["trainer.max_epochs"] == -1


@pytest.mark.parametrize(
    "axis, message",
    [
        ({"key": "model.init_args.connector.init_args.deepth", "values": [1, 2]}, "deepth"),
        ({"key": "model.init_args.connector.init_args.depth", "values": [2, "deep"]}, "depth"),
        ({"key": "trainer.max_epoch", "values": [1, 2]}, "max_epoch"),
    ],
)
def test_a_bad_axis_fails_at_expansion_naming_the_arm(shapes_root, tmp_path, axis, message):
    grid = grid_from_dict(tiny_grid(shapes_root, tmp_path, axes={"a": axis}), source="g.yaml")
    with pytest.raises(GridError) as error:
        resolve_arms(grid)
    text = str(error.value)
    bad = 1 if axis["values"][0] == 2 else 0
    assert f"arm a={axis['values'][bad]}" in text and message in text


def test_check_build_builds_each_condition_and_names_the_arm_a_class_refuses(shapes_root, tmp_path):
    node = tiny_grid(
        shapes_root,
        tmp_path,
        axes={"fl": {"key": "model.init_args.vision_tower.init_args.feature_layer", "values": [-1, -5]}},
    )
    resolve_arms(
        grid_from_dict({**node, "axes": {"fl": {**node["axes"]["fl"], "values": [-1, -2]}}, "check": "build"})
    )
    with pytest.raises(GridError, match=r"arm fl=-5 .*building the model.*feature_layer=-5"):
        resolve_arms(grid_from_dict({**node, "check": "build"}))
    resolve_arms(grid_from_dict(node))  # parsing alone accepts it: -5 is an int


def test_an_axis_that_changes_nothing_is_refused(shapes_root, tmp_path):
    grid = grid_from_dict(tiny_grid(shapes_root, tmp_path, axes={"unused": [1, 2]}))
    with pytest.raises(GridError, match="resolve to the same config"):
        resolve_arms(grid)


def test_matching_samples_and_flops(shapes_root, tmp_path):
    axes = {"bs": {"key": "data.init_args.batch_size", "values": [2, 4]}}
    plans = resolve_arms(grid_from_dict(tiny_grid(shapes_root, tmp_path, axes=axes, match={"samples": 10})))
    assert [p.steps for p in plans] == [5, 3]  # ceil(10 / 2), ceil(10 / 4)
    axes = {"size": {"key": "model.init_args.vision_tower.init_args.image_size", "values": [32, 64]}}
    plans = resolve_arms(
        grid_from_dict(
            tiny_grid(shapes_root, tmp_path, axes=axes, match={"flops": "1e11", "text_tokens": 64})
        )
    )
    small, large = plans
    assert large.flops_per_sample > small.flops_per_sample  # 4x the tower features and image tokens
    for plan in plans:
        assert plan.steps == max(1, round(1e11 / (4 * plan.flops_per_sample)))
    assert small.steps > large.steps


def test_dry_run_lists_only_what_differs(shapes_root, tmp_path):
    axes = {"depth": {"key": "model.init_args.connector.init_args.depth", "values": [1, 2]}}
    plans = resolve_arms(grid_from_dict(tiny_grid(shapes_root, tmp_path, axes=axes, seeds=[0, 1])))
    diffs = differences(plans)
    assert diffs[0] == {"seed_everything": 0, "model.init_args.connector.init_args.depth": 1}
    assert diffs[3] == {"seed_everything": 1, "model.init_args.connector.init_args.depth": 2}
    listing = describe_plans(plans)
    assert "depth=2_seed=1  max_steps=3" in listing and "batch_size" not in listing


@pytest.mark.parametrize(
    "df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (9, 2.262), (29, 2.045)]
)
def test_t_quantiles_match_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


def test_intervals_and_welch():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.sd) == (2.0, 1.0)
    assert s.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert math.isnan(summarize([1.0]).half_width)
    # Welch by hand: var 1/3 + 1.0833/3, df = (0.4722)^2 / ((1/3)^2 / 2 + (0.3611)^2 / 2) = 3.806
    d = welch([4.0, 5.0, 6.5], [1.0, 2.0, 3.0])
    assert d.df == pytest.approx(3.806, abs=1e-3)
    assert d.diff == pytest.approx(3 + 1 / 6)
    assert d.exceeds_noise
    assert not welch([1.0, 2.0, 3.0], [1.5, 2.5, 2.0]).exceeds_noise
