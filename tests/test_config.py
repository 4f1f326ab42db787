import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ParamsError, load_params, parse_override, parse_params


def test_defaults_are_valid_and_match_params_yaml():
    from conftest import REPO
    p = load_params(REPO / "params.yaml")
    assert p.data.name == "digits"
    assert all(b >= 1 for b in p.train.batch_sizes)


@pytest.mark.parametrize("raw, needle", [
    ({"train": {"lr": -1}}, "train.lr=-1"),
    ({"train": {"lr": 0}}, "greater than 0"),
    ({"train": {"max_steps": 0}}, "train.max_steps=0"),
    ({"train": {"curve_targets": [0.1]}}, "train.curve_targets=[0.1]"),
    ({"train": {"batch_sizes": [8, 0]}}, "positive integers"),
    ({"train": {"batch_sizes": [8, 8]}}, "distinct"),
    ({"train": {"batch_sizes": [8, "x"]}}, "train.batch_sizes"),
    ({"train": {"batch_sizes": []}}, "at least one"),
    ({"data": {"name": "imagenet"}}, "'cifar10', 'cifar100', 'imagefolder' or 'linear'"),
    ({"train": {"optimizer": "lion"}}, "train.optimizer='lion'"),
    ({"model": {"width": 3}}, "model.width=3: not a key of model.name='mlp'"),
    ({"model": {"code": "/abs/nets.py"}}, "model.code='/abs/nets.py'"),
    ({"data": {"transforms": [["Resize", 3]]}}, "is not a transform"),
    ({"model": {"hidden_sizes": [0]}}, "positive"),
    ({"data": {"name": "linear"}, "model": {"name": "mlp"}}, "does not fit"),
])
def test_bad_values_name_key_value_and_allowed(raw, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg


def test_unknown_key_is_rejected_by_name_with_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"learning_rate": 0.1}})
    msg = str(err.value)
    assert "train.learning_rate" in msg and "lr" in msg and "batch_sizes" in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        parse_params({"trian": {}})


def test_overrides_are_yaml_values_never_code(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    p = load_params(path, ["train.lr=0.01", "train.batch_sizes=8,64", "model.hidden_sizes=[16, 8]"])
    assert p.train.lr == 0.01
    assert p.train.batch_sizes == (8, 64)
    assert p.model.hidden_sizes == (16, 8)
    assert parse_override("data.root=__import__('os')")[1] == "__import__('os')"


def test_override_without_equals_is_an_error():
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_sweep_key_names_the_batch_size_list_lr_and_data_but_not_evaluation():
    a = parse_params({"train": {"batch_sizes": [8]}})
    b = parse_params({"train": {"batch_sizes": [8, 64]}})
    c = parse_params({"train": {"batch_sizes": [8], "lr": 0.5}})
    d = parse_params({"train": {"batch_sizes": [8]}, "evaluate": {"batch_size": 7}})
    assert a.sweep_key("h") != b.sweep_key("h")
    assert a.sweep_key("h") != c.sweep_key("h")
    assert a.sweep_key("h") != a.sweep_key("other-data")
    assert a.sweep_key("h") == d.sweep_key("h")


def test_code_defaults_equal_params_yaml():
    """One source of parameters: what the code assumes is what params.yaml says."""
    from conftest import REPO
    assert load_params(REPO / "params.yaml") == parse_params({})


def test_a_params_file_that_does_not_exist_is_an_error_naming_it(tmp_path):
    with pytest.raises(ParamsError, match="nosuch.yaml.*not found"):
        load_params(tmp_path / "nosuch.yaml")


values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 600), max_size=4))
keys = st.sampled_from([
    ("train", "lr"), ("train", "epochs"), ("train", "batch_sizes"), ("train", "optimizer"),
    ("train", "momentum"), ("data", "name"), ("data", "val_fraction"), ("model", "hidden_sizes"),
    ("model", "name"), ("tracking", "max_points"), ("train", "nonsense"), ("evaluate", "batch_size"),
    ("train", "warmup_epochs"), ("train", "lr_scaling"), ("train", "target_value")])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=4))
def test_any_configuration_parses_or_gives_one_line_error(entries):
    raw: dict = {}
    for (section, key), value in entries.items():
        raw.setdefault(section, {})[key] = value
    try:
        p = parse_params(raw)
    except ParamsError as err:
        assert str(err) and "\n" not in str(err)
    else:
        assert p.train.lr > 0 and p.train.epochs >= 0 and p.train.max_steps >= 1 and all(b >= 1 for b in p.train.batch_sizes)


def test_named_configurations_are_valid():
    from conftest import REPO
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert names == ["cifar10", "imagefolder", "linear", "mnist"]
    linear = load_params(REPO / "configs" / "linear.yaml")
    assert (linear.data.name, linear.model.name, linear.train.optimizer, linear.train.lr) == ("linear", "linear", "sgd", 0.01)
    mnist = load_params(REPO / "configs" / "mnist.yaml")
    assert mnist.model.hidden_sizes == (128,) and 64 in mnist.train.batch_sizes
    from pipeline.core.models import check_model
    for name in ("cifar10", "imagefolder"):  # the user-model and torchvision examples import and bind
        check_model(load_params(REPO / "configs" / f"{name}.yaml").model, REPO, build=True)
