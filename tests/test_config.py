"""Config loading: schema errors name the key and the fix, overrides, merges, built-in methods."""

from __future__ import annotations

import pytest
import yaml

from relkd import configs
from relkd.config import ConfigError, apply_overrides, load_config, parse_override, to_data
from relkd.losses import LOSSES

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "train_subset": 50, "unlabeled": True},
    "teacher": {"model": "mlp", "args": {"width": 32}, "data": {"train_subset": None, "unlabeled": False}},
    "student": "mlp",
    "train": {"epochs": 2},
    "methods": ["baseline", "kd"],
}


def load(cli=(), **changes):
    return load_config({**TINY, **changes}, list(cli))[0]


def error(cli=(), **changes) -> str:
    with pytest.raises(ConfigError) as info:
        load(cli, **changes)
    return str(info.value)


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_key_names_the_path_and_the_closest_key():
    msg = error(["data.batchsize=32"])
    assert msg.startswith("data.batchsize: unknown key")
    assert "'batch_size'" in msg


def test_unknown_top_level_key_suggests():
    assert "'seeds'" in error(seed=[0])


def test_unknown_key_deep_in_a_method():
    msg = error(["methods.kd.train.ce_wieght=0.5"])
    assert "methods.kd.train.ce_wieght" in msg and "'ce_weight'" in msg


def test_wrong_type_names_key_expected_type_and_value():
    msg = error(["train.epochs=ten"])
    assert "train.epochs" in msg and "integer" in msg and "'ten'" in msg


def test_bool_is_not_an_integer():
    assert "data.batch_size" in error(["data.batch_size=true"])


def test_loss_option_typo_is_caught_before_training():
    msg = error(["methods=[rkd]", "methods.rkd.losses.rkd.distance_wieght=2"])
    assert "methods.rkd.losses.rkd.distance_wieght" in msg and "'distance_weight'" in msg


def test_loss_option_wrong_type():
    msg = error(["methods.kd.losses.kd.T=hot"])
    assert "methods.kd.losses.kd.T" in msg and "number" in msg


def test_unknown_loss_suggests_a_registered_one():
    msg = error(methods={"m": {"losses": {"rkdd": {}}}})
    assert "methods.m.losses.rkdd" in msg and "'rkd'" in msg


def test_unknown_builtin_method_suggests():
    assert "'rkd'" in error(methods=["rdk"])


def test_optimizer_options_refine_the_default_unless_renamed():
    assert load(["train.optimizer.lr=0.2"]).train.optimizer == {
        "name": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "weight_decay": 5e-4,
    }
    assert load(["train.optimizer={name: adamw}"]).train.optimizer == {"name": "adamw"}


def test_optimizer_option_typo():
    msg = error(["train.optimizer.momentun=0.9"])
    assert "train.optimizer.momentun" in msg and "'momentum'" in msg


def test_unknown_dataset_and_model():
    assert "'digits'" in error(["data.name=digit"])
    assert "'resnet8x4'" in error(student="resnet8x5")


def test_distillation_without_teacher_is_an_error():
    assert "teacher" in error(teacher=None)


def test_stage_term_must_be_a_term_of_the_method():
    method = {"losses": {"kd": {}}, "stages": [{"terms": ["rkd"]}]}
    assert "methods.m.stages.0.terms.rkd" in error(methods={"m": method})


def test_stage_call_must_be_a_method_of_the_loss():
    method = {"losses": {"kd": {}}, "stages": [{"terms": {"kd": {"call": "distil"}}}]}
    msg = error(methods={"m": method})
    assert "methods.m.stages.0.terms.kd.call" in msg and "'distill'" in msg


def test_yaml_on_key_gets_a_hint():
    text = "methods:\n  m:\n    losses: {kd: {}}\n    stages: [{terms: {kd: {on: teacher}}}]\n"
    msg = error(methods=yaml.safe_load(text)["methods"])
    assert "True" in msg and "quote" in msg


def test_unlabeled_needs_a_subset():
    assert "train_subset" in error(["data.train_subset=null"])


def test_term_named_ce_is_refused():
    assert "'ce'" in error(methods={"m": {"losses": {"ce": {"loss": "kd"}}}})


# --- overrides -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("train.epochs=5", ["train", "epochs"], 5),
        ("seeds=[0, 1]", ["seeds"], [0, 1]),
        ("teacher=null", ["teacher"], None),
        ("data.root=/data/cifar", ["data", "root"], "/data/cifar"),
        ("train.optimizer={name: adamw, lr: 0.001}", ["train", "optimizer"], {"name": "adamw", "lr": 0.001}),
        ("amp=", ["amp"], None),
    ],
)
def test_parse_override_reads_yaml_values(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["epochs", "=3", "a..b=1", "x=[1,"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_apply_overrides_creates_mappings_and_indexes_lists():
    out = apply_overrides({"a": [{"b": 1}, {"b": 2}]}, ["a.1.b=5", "c.d=x"])
    assert out == {"a": [{"b": 1}, {"b": 5}], "c": {"d": "x"}}
    with pytest.raises(ConfigError, match="0..1"):
        apply_overrides({"a": [1, 2]}, ["a.7=0"])


def test_override_of_a_method_after_replacing_the_list():
    config = load(["methods=[kd]", "methods.kd.train.ce_weight=0.5"])
    assert list(config.methods) == ["kd"]
    assert config.methods["kd"].train.ce_weight == 0.5


def test_overrides_in_the_file_apply_before_the_command_line():
    config = load(["train.epochs=7"], overrides=["train.epochs=3", "seeds=[4]"])
    assert config.train.epochs == 7 and config.seeds == [4]


# --- merges and built-in methods ---------------------------------------------------------------------


def test_teacher_data_and_train_refine_the_suites():
    config = load(["teacher.train.epochs=9"])
    assert config.teacher.data.train_subset is None and config.teacher.data.name == "digits"
    assert config.teacher.train.epochs == 9 and config.train.epochs == 2
    assert config.methods["kd"].train.epochs == 2


def test_builtin_method_brings_its_recipe_changes():
    kd = load().methods["kd"]
    assert kd.losses == {"kd": {"weight": 0.9, "T": 4.0}}
    assert kd.train.ce_weight == 0.1


def test_loss_args_set_every_term_of_that_loss():
    config = load(loss_args={"kd": {"T": 2.0}})
    assert config.methods["kd"].losses["kd"]["T"] == 2.0


def test_extends_a_method_and_changes_it():
    config = load(methods={"soft": {"extends": "kd", "losses": {"kd": {"T": 8.0}}}})
    assert config.methods["soft"].losses["kd"] == {"weight": 0.9, "T": 8.0}
    assert config.methods["soft"].train.ce_weight == 0.1


def test_extends_a_config_file(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\ntrain: {epochs: 4}\n")
    config, _ = load_config(tmp_path / "child.yaml")
    assert config.name == "child" and config.train.epochs == 4 and config.data.train_subset == 50


def test_method_from_a_yaml_path(tmp_path):
    (tmp_path / "mine.yaml").write_text("losses: {rkd: {weight: 2.0}}\n")
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({**TINY, "methods": ["mine.yaml"]}))
    config, _ = load_config(tmp_path / "suite.yaml")
    assert config.methods["mine"].losses == {"rkd": {"weight": 2.0}}


def test_all_with_a_builtin_method_whose_loss_is_missing_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "baseline.yaml").write_text("losses: {}\n")
    (tmp_path / "future.yaml").write_text("losses: {not_yet_a_loss: {}}\n")
    monkeypatch.setattr(configs, "METHODS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="'future' needs the loss 'not_yet_a_loss'.*reinstall"):
        load_config({**TINY, "methods": "all"})


def test_every_builtin_method_validates():
    names = configs.method_names()
    assert all(t in LOSSES for n in names for t in _loss_names(n))
    config = load(methods=names)
    assert list(config.methods) == names
    assert names[0] == "baseline"


def _loss_names(method: str) -> list[str]:
    data = yaml.safe_load(configs.method_path(method).read_text()) or {}
    return [(t or {}).get("loss", name) for name, t in (data.get("losses") or {}).items()]


def test_resolved_config_loads_back_to_the_same_config():
    config = load(["methods=[kd, baseline]"])
    again, _ = load_config(yaml.safe_load(yaml.safe_dump(to_data(config))))
    assert again == config


def test_default_experiment_loads():
    config, _ = load_config(None)
    assert config.data.name == "digits" and config.seeds == [0, 1, 2]
    assert config.teacher.data.train_subset is None and config.data.train_subset is not None
    assert "baseline" in config.methods and "kd" in config.methods


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("no/such/config.yaml")
