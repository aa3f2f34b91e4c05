"""Grid expansion (lit_mllm/ablate/grid.py), no parser involved: names unique and stable (hypothesis), the
order of arms, zipped axes, ${axis} variables, patches merged, and refusals that name what is wrong."""

from __future__ import annotations

import itertools

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.ablate.grid import GridError, expand, grid_from_dict, merge, nest

scalars = st.one_of(
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(alphabet="abcxyz_/. 019", min_size=1, max_size=8),
)


@st.composite
def grids(draw):
    """Grids of 1-3 keyed axes with distinct values (whose labels may collide: then labels are given)."""
    n_axes = draw(st.integers(1, 3))
    axes = {}
    for i in range(n_axes):
        values = draw(st.lists(scalars, min_size=1, max_size=4, unique_by=repr))
        spec = {"key": f"model.init_args.k{i}", "values": values}
        if draw(st.booleans()) or len({str(v) for v in values}) < len(values):
            spec["labels"] = [f"v{j}" for j in range(len(values))]
        axes[f"a{i}"] = spec
    seeds = draw(st.lists(st.integers(0, 99), max_size=3, unique=True))
    node = {"base": ["configs/quickstart.yaml"], "axes": axes}
    if seeds:
        node["seeds"] = seeds
    return node


def _grid(node):
    try:
        return grid_from_dict(node)
    except GridError as e:  # two values whose auto labels collide after sanitising ("a b" and "a_b")
        assert "give `labels`" in str(e)
        return None


@settings(max_examples=80, deadline=None)
@given(grids())
def test_names_are_unique_stable_and_made_of_the_varying_axes(node):
    grid = _grid(node)
    if grid is None:
        return
    arms = expand(grid)
    names = [a.name for a in arms]
    sizes = [len(spec["values"]) for spec in node["axes"].values()]
    assert len(arms) == max(1, len(node.get("seeds", []))) * _product(sizes)
    assert len(set(names)) == len(names)
    assert names == [a.name for a in expand(grid_from_dict(node))]  # stable
    varying = [n for n, spec in node["axes"].items() if len(spec["values"]) > 1]
    for arm in arms:
        parts = arm.name.split("_") if arm.name != "default" else []
        expected = [f"{a}={arm.labels[a]}" for a in varying]
        if len(node.get("seeds", [])) > 1:
            expected.append(f"seed={arm.seed}")
        assert parts == expected


@settings(max_examples=40, deadline=None)
@given(grids(), st.randoms(use_true_random=False))
def test_a_name_depends_on_the_arm_s_values_not_on_the_order_of_values_in_the_file(node, rnd):
    grid = _grid(node)
    if grid is None:
        return
    shuffled = yaml.safe_load(yaml.safe_dump(node))
    for spec in shuffled["axes"].values():
        order = list(range(len(spec["values"])))
        rnd.shuffle(order)
        spec["values"] = [spec["values"][i] for i in order]
        if "labels" in spec:
            spec["labels"] = [spec["labels"][i] for i in order]
    name_of = {_key(a.values): a.name for a in expand(grid)}
    other = {_key(a.values): a.name for a in expand(grid_from_dict(shuffled))}
    assert name_of == other


def _key(values):
    return tuple(sorted((k, repr(v)) for k, v in values.items()))


def _product(sizes):
    out = 1
    for s in sizes:
        out *= s
    return out


def test_order_seeds_outermost_last_axis_fastest_and_zip():
    node = {
        "axes": {"a": {"key": "x.a", "values": [1, 2]}, "b": {"key": "x.b", "values": [3, 4]}, "c": [5, 6]},
        "zip": [["b", "c"]],
        "seeds": [0, 1],
    }
    names = [a.name for a in expand(grid_from_dict(node))]
    expected = [f"a={a}_b={b}_c={c}_seed={s}" for s in (0, 1) for a in (1, 2) for b, c in ((3, 5), (4, 6))]
    assert names == expected


def test_variables_patches_and_configs_become_one_config_stack():
    node = {
        "base": ["configs/quickstart.yaml", {"data": "configs/data/mm1_mixture.yaml"}],
        "set": {"trainer.max_steps": 5, "model.init_args.tag": "t${tokens}"},
        "axes": {
            "tokens": [16, 36],
            "connector": {
                "avgpool": {
                    "config": "configs/model/mm1_avgpool.yaml",
                    "model.init_args.connector.init_args.out_tokens": "${tokens}",
                },
                "plain": {},
            },
            "res": {
                "key": "model.init_args.vision_tower.init_args.image_size",
                "values": [32],
                "labels": ["32px"],
            },
        },
    }
    arms = expand(grid_from_dict(node))
    assert [a.name for a in arms] == [
        "tokens=16_connector=avgpool",
        "tokens=16_connector=plain",
        "tokens=36_connector=avgpool",
        "tokens=36_connector=plain",
    ]  # res has one level: applied, not named
    args = list(arms[2].args)
    assert args[:4] == ["--config", "configs/quickstart.yaml", "--data", "configs/data/mm1_mixture.yaml"]
    assert args[4:6] == ["--config", "{trainer: {max_steps: 5}, model: {init_args: {tag: t36}}}"]
    assert args[6:8] == ["--config", "configs/model/mm1_avgpool.yaml"]
    last = yaml.safe_load(args[9])
    assert last["model"]["init_args"]["connector"]["init_args"]["out_tokens"] == 36  # typed, not "36"
    assert last["model"]["init_args"]["vision_tower"]["init_args"]["image_size"] == 32


def test_merge_replaces_a_part_whose_class_changes_and_nest_refuses_overlaps():
    a = {"m": {"class_path": "A", "init_args": {"x": 1}}, "k": 1}
    assert merge([a, {"m": {"init_args": {"y": 2}}}]) == {
        "m": {"class_path": "A", "init_args": {"x": 1, "y": 2}},
        "k": 1,
    }
    assert merge([a, {"m": {"class_path": "B"}}]) == {"m": {"class_path": "B"}, "k": 1}
    with pytest.raises(GridError, match="same patch"):
        nest({"a.b": 1, "a.b.c": 2})


@pytest.mark.parametrize(
    "node, message",
    [
        ({"axes": {"a": [1]}, "sweeps": 3}, "unknown key"),
        ({"axes": {"a b": [1]}}, "axis name"),
        ({"axes": {"a": {"key": "x", "values": [1, 2], "labels": ["same", "same"]}}}, "share the label"),
        ({"axes": {"a": {"key": "x", "values": ["p q", "p_q"]}}}, "give `labels`"),
        ({"axes": {"a": {"key": "x", "values": [1, 2], "labels": ["one"]}}}, "1 labels for 2 values"),
        ({"axes": {"a": [1, 2]}, "set": {"x": "${b}"}}, r"\$\{b\} names no axis"),
        ({"axes": {"a": [1, 2], "b": [1]}, "zip": [["a", "b"]]}, "as many values"),
        ({"axes": {"a": [1]}, "zip": [["a", "c"]]}, "not axes"),
        ({"seeds": [1, 1]}, "distinct integers"),
        ({"match": {"steps": 1, "flops": 2}}, "exactly one of"),
        ({"match": {"minutes": 3}}, "match:"),
        ({"report": {"x": "nope"}}, "not an axis"),
        ({"base": [{"optimizer": "f.yaml"}]}, "a base entry"),
        ({"check": "run"}, "check must be one of"),
    ],
)
def test_a_bad_grid_is_refused_naming_what_is_wrong(node, message):
    with pytest.raises(GridError, match=message):
        grid_from_dict(node, source="g.yaml")


def test_a_reference_error_names_the_arm():
    node = {"axes": {"a": {"one": {"x.y": "${nope}"}, "two": {}}}}
    with pytest.raises(GridError, match=r"arm a=one: axis a=one: \$\{nope\}"):
        grid_from_dict(node)


def test_labels_of_values_are_short():
    node = {
        "axes": {
            "f": {"configs": ["configs/model/mm1_avgpool.yaml", ["configs/a.yaml", "configs/b.yaml"]]},
            "lr": {"key": "x", "values": [0.001, 1.0e-4, True, None]},
        }
    }
    arms = expand(grid_from_dict(node))
    assert sorted({a.labels["f"] for a in arms}) == [
        "a+b",
        "mm1-avgpool",
    ]  # "_" separates the parts of a name
    assert [a.labels["lr"] for a in arms[:4]] == ["0.001", "0.0001", "true", "none"]
    assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789.+-_=" for a in arms for c in a.name.lower())


def test_every_combination_once():
    node = {"axes": {"a": [1, 2, 3], "b": {"key": "k", "values": ["x", "y"]}}, "seeds": [3, 4]}
    arms = expand(grid_from_dict(node))
    combos = {(a.values["a"], a.values["b"], a.seed) for a in arms}
    assert combos == set(itertools.product([1, 2, 3], ["x", "y"], [3, 4]))
    assert {a.condition for a in arms} == {f"a={a}_b={b}" for a in (1, 2, 3) for b in "xy"}
