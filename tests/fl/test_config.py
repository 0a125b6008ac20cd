"""The run config: each method's options as a table of its own, set from a file, ``--set`` or a dict, checked
with errors that name the field; a ``config.json`` written before the tables still reads."""

import pytest

from fed_plora.fl import Config, load_config
from fed_plora.fl.config import toml_literal
from fed_plora.fl.strategies import STRATEGIES


def test_method_tables_from_a_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[methods]\nnames = ["fedit"]\n[methods.fedplora]\nfold_mode = "exact"\n[methods.hetlora]\nprune_gamma = 0.5\n'
    )
    config = load_config(path, ["methods.fedit.client_rank=4"])
    assert config.methods.fedplora.fold_mode == "exact" and config.methods.hetlora.prune_gamma == 0.5
    assert config.methods.fedit.client_rank == 4 and config.methods.names == ["fedit"]
    assert Config.from_dict(config.to_dict()) == config
    assert set(config.to_dict()["methods"]) == {"names", *STRATEGIES}


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("methods.fedit.client_rank=0", ValueError, "methods.fedit: client_rank must be a positive integer"),
        ('methods.fedit.client_rank="4"', ValueError, "methods.fedit: client_rank must be a positive integer"),
        ('methods.fedplora.fold_mode="fold"', ValueError, "methods.fedplora: fold_mode must be one of"),
        ("methods.hetlora.prune_gamma=1.5", ValueError, r"methods.hetlora: prune_gamma must lie in \(0, 1\)"),
        ("methods.flora.rank=2", KeyError, r"unknown key methods.flora.rank; keys of \[methods.flora\] are \[\]"),
        ("methods.fedplora=1", TypeError, "methods.fedplora is a table"),
        ("methods.names.first=1", KeyError, "methods.names is a value, not a table"),
        ('methods.fold_mode="exact"', KeyError, "methods.fold_mode is now methods.fedplora.fold_mode"),
    ],
)
def test_bad_method_options_name_the_field(override, error, message):
    with pytest.raises(error, match=message):
        load_config(None, [override])


def test_a_config_json_from_before_the_method_tables_reads():
    old = {"methods": {"names": ["fedit"], "fold_mode": "exact", "fedit_rank": 2, "hetlora_prune_gamma": None}}
    config = Config.from_dict(old)
    assert config.methods.fedplora.fold_mode == "exact" and config.methods.fedit.client_rank == 2
    assert config.methods.hetlora.prune_gamma is None


def test_toml_literal_round_trips():
    cases = {
        "model.name": 'a "quoted" \\ path',
        "federation.rank_choices": [1, 2],
        "train.lr": 0.5,
        "model.target_modules": ["x", "y"],
    }
    for key, value in cases.items():
        section, field = key.split(".")
        assert getattr(getattr(load_config(None, [f"{key}={toml_literal(value)}"]), section), field) == value


def test_every_field_carries_its_rule_and_help():
    """The rule table is read from the sections: every field of every section has a rule and a help beside it
    (a method's options: what they allow and what they do), and nothing else is in the table."""
    from fed_plora.fl.config import FIELDS, SECTIONS, field_rows

    rows = field_rows()
    assert all(r["allowed"] and r["help"] for r in rows), [r["field"] for r in rows if not (r["allowed"] and r["help"])]
    options = {r["field"] for r in rows if r["field"].count(".") == 2}
    assert {r["field"] for r in rows} - options == set(FIELDS)
    expected = {f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.__dataclass_fields__ if k not in STRATEGIES}
    assert set(FIELDS) == expected
    assert options == {f"methods.{m}.{k}" for m, cls in STRATEGIES.items() for k in cls.Options.__dataclass_fields__}


def test_the_config_page_is_the_listing(capsys):
    """docs/config.md holds what ``fed-plora config --markdown`` prints now."""
    from helpers import REPO_ROOT

    from fed_plora.fl.cli import main

    assert main(["config", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    page = (REPO_ROOT / "docs" / "config.md").read_text()
    assert page[page.index("| field |") :].strip() == table, (
        "docs/config.md is stale: rewrite it from `fed-plora config --markdown`"
    )


def test_config_listing_by_section_and_a_bad_section(capsys):
    from fed_plora.fl.cli import main

    assert main(["config", "train"]) == 0
    out = capsys.readouterr().out
    assert "train.lr: float = 0.001" in out and "a number in (0, inf)" in out and "run.seed" not in out
    assert main(["config", "trian"]) == 2
    assert "config 'trian': not a section; the sections are run, task" in capsys.readouterr().err
