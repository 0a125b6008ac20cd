"""Config values are checked when the config is loaded: one error naming the field, its
value and what is allowed; a run whose every client failed exits non-zero."""

import dataclasses
import json

import pytest
from helpers import DATA, needs_data

from fed_plora.fl import Config, load_config
from fed_plora.fl.cli import main
from fed_plora.fl.config import FIELDS, ConfigError
from fed_plora.fl.storage import dumps

BAD = [
    ("train.lr=-0.001", r"train.lr = -0.001: must be a number in \(0, inf\)"),
    ("train.lr=nan", r"train.lr = nan: must be a number in \(0, inf\)"),
    ("train.batch_size=0", r"train.batch_size = 0: must be an integer >= 1"),
    ('methods.fedplora.fold_mode="mergee"', r"methods.fedplora: fold_mode must be one of \('merge', 'exact'\), got 'mergee'"),
    ("methods.fedplora.fold_mode=mergee", r"methods.fedplora: fold_mode must be one of"),  # a bare word is a string
    ("methods.hetlora.prune_gamma=1", r"methods.hetlora: prune_gamma must lie in \(0, 1\)"),
    ("methods.fedit.client_rank=true", r"methods.fedit: client_rank must be a positive integer"),
    ("federation.update_norm_bound=-1", r"federation.update_norm_bound = -1: must be a number in \(0, inf\]"),
    ('federation.rounds="ten"', r"federation.rounds = 'ten': must be an integer >= 1"),
    ("federation.rounds=0", r"federation.rounds = 0: must be an integer >= 1"),
    ("federation.rounds=true", r"federation.rounds = True: must be an integer >= 1"),  # a bool is not an int
    ("federation.rounds=2.0", r"federation.rounds = 2.0: must be an integer >= 1"),
    ("federation.fraction=0", r"federation.fraction = 0: must be a number in \(0, 1\]"),
    ("federation.fraction=1.5", r"federation.fraction = 1.5: must be a number in \(0, 1\]"),
    ('federation.partition="dirichet"', r"federation.partition = 'dirichet': must be one of iid, dirichlet, category"),
    ("federation.rank_choices=[2, true]", r"federation.rank_choices = \[2, True\]: must be a non-empty list of integers >= 1"),
    ("federation.rank_choices=[]", r"federation.rank_choices = \[\]: must be a non-empty list of integers >= 1"),
    ("train.eval_every=0", r"train.eval_every = 0: must be an integer >= 1"),
    ("task.max_train_examples=0", r"task.max_train_examples = 0: must be an integer >= 1, or unset"),
    ("task.max_length=0", r"task.max_length = 0: must be an integer >= 1"),
    ('task.name="colaa"', r"task.name = 'colaa': must be one of cola, sst2"),
    ("methods.names=[]", r"methods.names = \[\]: must be a non-empty list of distinct methods from fedplora"),
    ('methods.names=["fedit", "fedit"]', r"methods.names = \['fedit', 'fedit'\]: must be a non-empty list of distinct"),
    ('methods.names=["fedavg"]', r"methods.names = \['fedavg'\]: must be a non-empty list of distinct methods"),
    ("model.dropout=1", r"model.dropout = 1: must be a number in \[0, 1\)"),
    ("model.target_modules=[]", r"model.target_modules = \[\]: must be a non-empty list of non-empty strings, or unset"),
    ('run.device="gpu"', r"run.device = 'gpu': must be one of auto, cpu, cuda"),
    ("run.seed=-1", r"run.seed = -1: must be an integer in \[0, "),
    ('run.name="../../x"', r"run.name = '../../x': must be a plain directory name"),
    ('run.name="/tmp/x"', r"run.name = '/tmp/x': must be a plain directory name"),
    ('run.name=".."', r"run.name = '..': must be a plain directory name"),
    ('run.name=""', r"run.name = '': must be a plain directory name"),
    # fields that depend on each other, checked once the whole config is loaded
    ("model.rank=4", r"federation.rank_choices = \[2, 4, 8, 16\]: every rank must lie in \[1, model.rank = 4\], not \[8, 16\]"),
    ('federation.rank_scheme="fixed"', r"rank_scheme 'fixed' needs one rank per client \(federation.clients = 10\)"),
    ("train.local_steps=0", r"train.local_steps = 0, train.local_epochs = None: set local_steps >= 1 or local_epochs > 0"),
    ("train.local_epochs=1", r"train.local_epochs = 1.0 would be ignored while train.local_steps = 10"),
    ("task.max_train_examples=5", r"task.max_train_examples = 5: fewer than federation.clients = 10"),
    ("methods.fedit.client_rank=32", r"methods.fedit.client_rank = 32: must lie in \[1, model.rank = 16\]"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_a_bad_value_names_the_field_its_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_good_values_and_conversions():
    config = load_config(None, ["train.lr=1", "federation.update_norm_bound=inf", "train.local_steps=0", "train.local_epochs=2"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)  # an int where a float is expected
    assert config.federation.update_norm_bound == float("inf") and config.train.local_epochs == 2.0
    text = dumps(config.to_dict())  # config.json is standard JSON: inf is written as "Infinity" and read back
    assert '"update_norm_bound": "Infinity"' in text and Config.from_dict(json.loads(text)) == config


def test_every_field_has_a_rule():
    sections = [f.name for f in dataclasses.fields(Config) if f.name != "methods"]
    fields = {f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(Config(), s))}
    assert fields | {"methods.names"} == set(FIELDS)


def test_a_config_file_and_a_config_dict_are_checked_too(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[methods.fedplora]\nfold_mode = "mergee"\n')
    with pytest.raises(ConfigError, match=rf"config {path}: methods.fedplora: fold_mode must be one of"):
        load_config(path)
    path.write_text("[train]\nlr = -1\n")
    with pytest.raises(ConfigError, match=rf"config {path}: train.lr = -1: must be a number"):
        load_config(path)
    path.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match=rf"config {path}: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"config dict: federation.rounds = 'ten'"):
        Config.from_dict({"federation": {"rounds": "ten"}})
    with pytest.raises(ConfigError, match=r"config dict: methods.fedplora: fold_mode must be one of"):
        Config.from_dict({"methods": {"fedplora": {"fold_mode": "mergee"}}})
    with pytest.raises(ConfigError, match=r"config dict: federation.rank_choices"):
        Config.from_dict({"model": {"rank": 2}})
    config = Config()
    config.train.batch_size = 0  # set behind load_config's back: checked again before a run
    with pytest.raises(ConfigError, match="train.batch_size = 0"):
        config.validate()


@needs_data
def test_command_line_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    base = ["run", "--data-dir", str(DATA), "--out-dir", str(tmp_path), "--name", "x", "--no-progress"]
    for extra, message in [
        (["--rounds", "0"], "federation.rounds = 0: must be an integer >= 1"),
        (["--task", "colaa"], "task.name = 'colaa': must be one of"),
        (["--set", "train.steps=3"], "unknown key train.steps"),
        (["--set", "train.lr=-0.001"], "train.lr = -0.001"),
        (["--name", "../../x"], "run.name = '../../x': must be a plain directory name"),
    ]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_data
def test_every_client_failing_exits_non_zero(tiny_models, tmp_path, capsys):
    """A valid config under which every update is rejected (a norm bound no update meets): the run
    finishes and writes its directory, but the command exits 1 and says why."""
    args = ["run", "--model", str(tiny_models / "bert"), "--data-dir", str(DATA), "--out-dir", str(tmp_path)]
    args += ["--name", "failed", "--methods", "fedplora", "--rounds", "2", "--clients", "2", "--no-progress"]
    sets = ["model.rank=4", "federation.rank_choices=[2, 4]", "task.max_train_examples=16", "task.max_eval_examples=4"]
    sets += ["task.max_length=16", "train.local_steps=1", "train.batch_size=4", "federation.update_norm_bound=1e-12"]
    sets += ["references.names=[]", 'train.lr_schedule="constant"']  # (cosine's last round, at lr 0, changes nothing)
    assert main(args + [a for s in sets for a in ("--set", s)]) == 1
    out = capsys.readouterr()
    assert "every client of every round failed for fedplora" in out.err and "round 1, client" in out.err
    assert "| fedplora |" in out.out
    records = [json.loads(line) for line in (tmp_path / "failed" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["ranks"] == [] and r["faults"] for r in records)
