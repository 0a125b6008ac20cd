"""Studies: the statistics against hand-computed values, the report from made-up rows, and
a tiny study of 2 settings × 2 seeds × 2 methods end to end: typos refused before anything runs, an
interrupted and a failed cell resumed without re-running finished ones (same results as straight through),
a changed setting refused naming the cell, two worker processes giving the same results as one, and two Ray
workers too, with a task whose worker died retried by Ray and resumed from the cell's checkpoints."""

import json
import math
import shutil
import sys

import pytest
import torch
from helpers import DATA, REPO_ROOT, needs_data

from fed_plora.fl.cli import main
from fed_plora.fl.config import Config
from fed_plora.fl.rounds import client
from fed_plora.fl.run import experiment, report
from fed_plora.fl.run.report import MB
from fed_plora.fl.storage import read_json, read_jsonl
from fed_plora.fl.study.config import StudyError, load_study
from fed_plora.fl.study.report import markdown, summarise
from fed_plora.fl.study.runner import run_study
from fed_plora.fl.study.stats import mean_std, paired_difference, t_quantile

# ---------------------------------------------------------------- statistics


def test_mean_std_by_hand():
    assert mean_std([]) == (None, None)
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # squares 2.25 + 0.25 + 0.25 + 2.25 = 5, over n − 1 = 3


@pytest.mark.parametrize(
    ("p", "df", "expected"),  # printed t tables (3 decimals)
    [
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 10, 2.228),
        (0.975, 30, 2.042),
        (0.95, 5, 2.015),
        (0.995, 3, 5.841),
    ],
)
def test_t_quantile_against_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=6e-4)


def test_t_quantile_limits_and_scipy():
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    assert t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-10)  # Cauchy: tan(π/4)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 29, 31, 120, 0.5, 2.5):
        for p in (0.6, 0.9, 0.975, 0.999, 0.9995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_paired_difference_by_hand():
    # differences 0.10, 0.05, 0.15: mean 0.10, std 0.05, half width 4.3027 · 0.05 / √3 = 0.12421
    d = paired_difference({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.7, 1: 0.65, 2: 0.75})
    assert (d.n, d.mean, d.std) == (3, pytest.approx(0.10), pytest.approx(0.05))
    assert (d.low, d.high) == (pytest.approx(0.10 - 0.124211, abs=1e-5), pytest.approx(0.10 + 0.124211, abs=1e-5))
    assert d.verdict == "tied"
    # differences 0.10, 0.12, 0.11: std 0.01, half width 0.024841: the interval excludes 0
    assert paired_difference({0: 0.6, 1: 0.62, 2: 0.61}, {0: 0.5, 1: 0.5, 2: 0.5}).verdict == "better"
    worse = paired_difference({0: 0.5, 1: 0.5, 2: 0.5}, {0: 0.6, 1: 0.62, 2: 0.61})
    assert worse.verdict == "worse" and worse.high == pytest.approx(-0.11 + 0.024841, abs=1e-5)
    # only seeds both have a value for; one pair has no interval, none no difference
    one = paired_difference({0: 0.7, 1: None, 3: 0.1}, {0: 0.5, 1: 0.4, 2: 0.3})
    assert (one.n, one.mean, one.low, one.verdict) == (1, pytest.approx(0.2), None, "n=1: no interval")
    assert paired_difference({0: 0.1}, {1: 0.2}).verdict == "no pairs"


# ---------------------------------------------------------------- study files and the report (nothing runs)


def _study_file(tmp_path, settings: str, head: str = "", base: str = "") -> str:
    (tmp_path / "base.toml").write_text(base or '[task]\nname = "sst2"\n[federation]\nrounds = 3\n')
    path = tmp_path / "study.toml"
    path.write_text(
        f'[study]\nname = "s"\nbase = "base.toml"\nseeds = [0, 1, 2]\nout_dir = "{tmp_path / "out"}"\n{head}\n{settings}'
    )
    return str(path)


def test_a_typo_in_any_setting_fails_before_anything_runs(tmp_path, capsys):
    good = '[settings.one]\n"federation.rank_scheme" = "fixed"\n"federation.rank_choices" = [2, 4, 8, 16, 16, 8, 4, 2, 2, 4]\n'
    good += "[settings.two.federation]\npartition = 'iid'\n"
    bad = {
        "[settings.three]\n'federation.rank_schem' = 'cycle'\n": ("setting 'three'", "unknown key federation.rank_schem"),
        "[settings.three]\n'federation.rank_scheme' = 'bogus'\n": ("setting 'three'", "federation.rank_scheme = 'bogus'"),
        "[settings.three.train]\nlr = true\n": ("setting 'three'", "train.lr = True"),
        "[settings.three]\n'run.seed' = 4\n": ("setting 'three'", "run.seed are set by the study"),
        "[settings.'thr/ee']\n": ("setting name 'thr/ee'", "plain directory name"),
    }
    for third, messages in bad.items():
        path = _study_file(tmp_path, good + third)
        with pytest.raises(StudyError) as error:
            load_study(path)
        assert all(m in str(error.value) for m in messages), str(error.value)
        assert main(["study", "--config", path, "--no-progress"]) == 2
        assert messages[0] in capsys.readouterr().err
        assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    with pytest.raises(StudyError, match="unknown keys \\['seed'\\] in \\[study\\]"):
        load_study(_study_file(tmp_path, good, head="seed = 3"))
    study = load_study(_study_file(tmp_path, good, head='methods = ["fedplora", "fedit"]'))
    assert [c.name for c in study.cells] == ["one/seed0", "one/seed1", "one/seed2", "two/seed0", "two/seed1", "two/seed2"]
    cell = study.cell("two", 1)
    assert (cell.config.run.seed, cell.config.federation.partition, cell.config.federation.rounds) == (1, "iid", 3)
    assert cell.config.methods.names == ["fedplora", "fedit"] and cell.directory == tmp_path / "out" / "s" / "two" / "seed1"
    assert study.cell("one", 0).config.federation.rank_scheme == "fixed"
    for example in (REPO_ROOT / "configs").glob("study_*.toml"):  # every study of the repository is valid
        assert load_study(example).cells
    with pytest.raises(StudyError, match="no setting 'three'"):
        run_study(study, only=["three"])
    with pytest.raises(StudyError, match="seeds \\[5\\]"):
        run_study(study, seeds=[5])


def _row(setting, seed, method, final, best, kind="federated", curve=None):
    curve = curve or [{"round": 1, "metric": best, "traffic_mib": 1.0}, {"round": 2, "metric": final, "traffic_mib": 2.0}]
    return {
        "setting": setting,
        "seed": seed,
        "method": method,
        "kind": kind,
        "metric": "accuracy",
        "final": final,
        "best": best,
        "agg_noise": 0.1,
        "agg_noise_modules": None if seed else 0.01,
        "traffic_mib": curve[-1]["traffic_mib"],
        "train_tflop": 1.0,
        "fold_server_gflop": 0.0,
        "wall_s": 10.0 + seed,
        "all_clients_failed": False,
        "curve": curve,
    }


def test_report_from_rows(tmp_path):
    from fed_plora.fl.study.plots import plot_curves, plot_metric, plot_traffic

    study = load_study(_study_file(tmp_path, "[settings.a]\n[settings.b]\n'federation.partition' = 'iid'\n"))
    rows = []
    for seed, (ours, theirs, best) in enumerate([(0.8, 0.7, 0.9), (0.7, 0.65, 0.81), (0.9, 0.75, 1.0)]):
        rows += [_row("a", seed, "fedplora", ours, ours + 0.01), _row("a", seed, "fedit", theirs, theirs)]
        rows.append(_row("a", seed, "centralised", best, best, "reference", [{"round": 2, "metric": best, "traffic_mib": 0.0}]))
    rows.append(_row("b", 0, "fedplora", 0.5, 0.5))
    rows.append(_row("b", 0, "flora", 0.4, 0.4))
    settings = summarise(study, rows)
    a = settings["a"]
    assert a["metric"] == "accuracy" and a["task"] == "sst2"
    assert [m["method"] for m in a["methods"]] == ["fedplora", "fedit", "centralised"]
    assert a["methods"][0]["final"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1)}
    assert a["methods"][1]["wall_s"] == {"mean": 11.0, "std": 1.0}
    fedit = a["differences"][0]["final"]  # fedit − fedplora: −0.10, −0.05, −0.15
    assert (fedit["n"], fedit["mean"], fedit["verdict"]) == (3, pytest.approx(-0.10), "tied")
    assert fedit["low"] == pytest.approx(-0.10 - 0.124211, abs=1e-5)
    assert a["differences"][1]["final"]["verdict"] == "better"  # centralised: 0.10, 0.11, 0.10 above
    assert settings["b"]["differences"][0]["final"]["verdict"] == "n=1: no interval"
    text = markdown(study, settings, ["b/seed1", "b/seed2"], {"b/seed1": "RuntimeError: planted\ntrace"}, [])
    assert "| **reference** |" in text and "| centralised | 3 | 0.9033 ± 0.095 |" in text
    assert "| fedplora | 3 | 0.8 ± 0.1 | 0.81 ± 0.1 |" in text
    assert "| fedit | 3 | -0.1 | [-0.2242, 0.02421] | tied |" in text
    assert "| centralised | 3 | 0.1033 | [0.08899, 0.1177] | centralised better |" in text
    assert "| flora | 1 | -0.1 | - | n=1: no interval |" in text
    assert "- b/seed1: failed: RuntimeError: planted\n- b/seed2\n" in text
    for plot, args in ((plot_metric, (settings,)), (plot_curves, (rows, ["a", "b"])), (plot_traffic, (rows, ["a", "b"]))):
        assert plot(*args, path=tmp_path / f"{plot.__name__}.png").stat().st_size > 0


# ---------------------------------------------------------------- a tiny study, run

#: The methods of the tiny study's cells: two federated ones, and the cheapest reference row where runs have them.
METHODS = ["fedplora", "fedit", *(["untrained"] if hasattr(Config(), "references") else [])]


BASE = """[model]
name = "{model}"
rank = 4
alpha = 8.0
[task]
data_dir = "{data}"
max_train_examples = 48
max_eval_examples = 8
max_length = 16
[federation]
clients = 3
fraction = 0.67
rounds = 2
rank_scheme = "cycle"
rank_choices = [1, 2, 4]
[train]
local_steps = 1
batch_size = 4
eval_batch_size = 8
""" + ('[references]\nnames = ["untrained"]\n' if len(METHODS) > 2 else "")

SETTINGS = """[settings.iid]
"federation.partition" = "iid"
[settings.skew.federation]
partition = "dirichlet"
dirichlet_alpha = {alpha}
"""


def _tiny_study(root, tiny_models, out, alpha="0.3") -> str:
    (root / "base.toml").write_text(BASE.format(model=tiny_models / "bert", data=DATA))
    path = root / f"study-{out}.toml"
    head = (
        f'[study]\nname = "tiny"\nbase = "base.toml"\nseeds = [0, 1]\nmethods = ["fedplora", "fedit"]\nout_dir = "{root / out}"\n'
    )
    path.write_text(head + SETTINGS.format(alpha=alpha))
    return str(path)


def _fast_plots(mp: pytest.MonkeyPatch) -> None:
    """No curves.png in the cells run in this process (over half a tiny cell's time; the study's plots stay)."""
    mp.setattr(report, "plot_curves", lambda results, metric, path: path.write_bytes(b""))


def _stable(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.fixture(scope="module")
def straight(tiny_models, tmp_path_factory):
    """The tiny study run straight through (in this process, one thread): its study directory."""
    root = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        _fast_plots(mp)
        try:
            assert main(["study", "--config", _tiny_study(root, tiny_models, "straight"), "--no-progress"]) == 0
        finally:
            torch.set_num_threads(threads)
    return root / "straight" / "tiny"


@needs_data
def test_a_tiny_study_end_to_end(straight):
    rows = read_jsonl(straight / "results.jsonl")
    assert [(r["setting"], r["seed"], r["method"]) for r in rows] == [
        (s, k, m) for s in ("iid", "skew") for k in (0, 1) for m in METHODS
    ]
    records = [r for r in read_jsonl(straight / "skew" / "seed1" / "metrics.jsonl") if r["method"] == "fedit"]
    row = rows[len(METHODS) * 3 + 1]
    traffic = sum(r["bytes_down_bf16"] + r["bytes_up_bf16"] for r in records) / MB
    assert row["traffic_mib"] == pytest.approx(traffic) and row["curve"][-1]["traffic_mib"] == pytest.approx(traffic)
    assert row["final"] == records[-1]["eval_matthews"] and row["final_loss"] == records[-1]["train_loss"]
    assert row["train_tflop"] == pytest.approx(sum(r["train_flops"] for r in records) / 1e12) and row["kind"] == "federated"
    assert [p["round"] for p in row["curve"]] == [1, 2] and row["wall_s"] > 0
    config = json.loads((straight / "skew" / "seed1" / "config.json").read_text())
    assert config["run"]["seed"] == 1 and config["federation"]["dirichlet_alpha"] == 0.3
    report = (straight / "report.md").read_text()
    assert "## iid" in report and "## skew" in report and "Cells finished: 4 of 4" in report
    assert "| fedit | 2 |" in report and ("| **reference** |" in report) == (len(METHODS) > 2)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["missing"] == [] and summary["settings"]["skew"]["differences"][0]["final"]["n"] == 2
    for plot in ("metric.png", "curves.png", "traffic.png"):
        assert (straight / plot).stat().st_size > 0


@needs_data
def test_interrupted_and_failed_cells_resume_without_rerunning_finished_ones(
    straight, tiny_models, tmp_path, monkeypatch, capsys
):
    path = _tiny_study(tmp_path, tiny_models, "resumed")
    study = tmp_path / "resumed" / "tiny"
    calls, train = [0], client.train_local

    def train_local(*args, **kwargs):  # 2 clients per round, 2 rounds, 2 methods: 8 trainings per cell
        calls[0] += 1
        if calls[0] == 20:  # skew/seed0, fedplora, round 2, second client
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(client, "train_local", train_local)
    _fast_plots(monkeypatch)
    assert main(["study", "--config", path, "--no-progress"]) == 130  # interrupted
    assert json.loads((study / "skew" / "seed0" / "checkpoints" / "fedplora.json").read_text())["rounds_done"] == 1
    finished = {c: (study / c / "metrics.jsonl").stat().st_mtime_ns for c in ("iid/seed0", "iid/seed1")}

    run = experiment.run_experiment

    def failing(config, *args, **kwargs):
        if config.run.out_dir.endswith("skew") and config.run.seed == 1:
            raise RuntimeError("planted failure")
        return run(config, *args, **kwargs)

    calls[0] = -100
    monkeypatch.setattr(experiment, "run_experiment", failing)
    assert main(["study", "--config", path, "--no-progress"]) == 1  # one cell failed, the others finished
    assert calls[0] == -100 + 2 + 4  # only fedplora's round 2 and fedit's two rounds of skew/seed0
    assert "cell skew/seed1: RuntimeError: planted failure" in capsys.readouterr().err
    assert "- skew/seed1: failed: RuntimeError: planted failure" in (study / "report.md").read_text()
    cells = [r["setting"] + str(r["seed"]) for r in read_jsonl(study / "results.jsonl")]
    assert cells == [c for c in ("iid0", "iid1", "skew0") for _ in METHODS]

    monkeypatch.setattr(experiment, "run_experiment", run)
    calls[0] = -100
    assert main(["study", "--config", path, "--no-progress"]) == 0
    assert calls[0] == -100 + 8  # the failed cell only
    assert finished == {c: (study / c / "metrics.jsonl").stat().st_mtime_ns for c in finished}
    assert _stable(read_jsonl(study / "results.jsonl")) == _stable(read_jsonl(straight / "results.jsonl"))
    outcome = run_study(load_study(path), progress=False, report=False)
    assert outcome.ran == [] and len(outcome.skipped) == 4 and calls[0] == -100 + 8


@needs_data
def test_a_changed_setting_is_refused_naming_the_cell(straight, tiny_models, tmp_path, capsys):
    root = straight.parent.parent
    path = _tiny_study(root, tiny_models, "straight", alpha="0.4")  # the same study directory, skew changed
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()}
    try:
        with pytest.raises(StudyError, match=r"cell skew/seed0 .*federation.dirichlet_alpha: 0.3 \(cell\) -> 0.4 \(study\)"):
            run_study(load_study(path), progress=False)
        for extra in ([], ["--report-only"], ["--only", "iid"]):
            assert main(["study", "--config", path, "--no-progress", *extra]) == 2
            assert "cell skew/seed1" in capsys.readouterr().err
    finally:
        _tiny_study(root, tiny_models, "straight")  # as the other tests expect it
    assert before == {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()}


@needs_data
def test_a_worker_process_gives_the_results_of_this_process(straight, tiny_models, tmp_path):
    path = _tiny_study(tmp_path, tiny_models, "parallel")
    base = tmp_path / "base.toml"  # the data given on the command line instead (it reaches the worker's cell)
    base.write_text("\n".join(line for line in base.read_text().splitlines() if not line.startswith("data_dir")))
    args = ["study", "--config", path, "--workers", "2", "--only", "iid", "--seeds", "0", "--data-dir", str(DATA)]
    assert main([*args, "--no-progress"]) == 0
    assert read_json(tmp_path / "parallel" / "tiny" / "iid" / "seed0" / "config.json")["task"]["data_dir"] == str(DATA)
    ours = read_jsonl(tmp_path / "parallel" / "tiny" / "results.jsonl")  # a worker process of one thread (one is enough)
    assert _stable(ours) == _stable(read_jsonl(straight / "results.jsonl"))[: len(METHODS)]
    assert "Cells finished: 1 of 4" in (tmp_path / "parallel" / "tiny" / "report.md").read_text()
    shutil.rmtree(tmp_path / "parallel")


#: A Ray worker's set-up hook (the test's): every local training logged; the fifth of a worker process, the
#: first such in the test, kills the process (after fedplora's two rounds of a cell, at fedit's first training).
RAY_HOOK = """
import os
from fed_plora.fl.rounds import client

def die_once():
    train, calls, root = client.train_local, [0], os.environ["FED_PLORA_TEST_RAY"]

    def train_local(*args, **kwargs):
        calls[0] += 1
        with open(os.path.join(root, "trainings"), "a") as log:
            log.write(f"{os.getpid()}\\n")
        if calls[0] == 5:
            try:
                os.close(os.open(os.path.join(root, "died"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return train(*args, **kwargs)

    client.train_local = train_local
"""


@needs_data
def test_ray_tasks_give_the_results_of_workers_and_a_dead_worker_s_cell_resumes(
    straight, tiny_models, tmp_path, monkeypatch, capsys
):
    ray = pytest.importorskip("ray")
    path = _tiny_study(tmp_path, tiny_models, "ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for flags, message in (
        (["--ray", "auto"], "--ray auto: no Ray cluster to join"),  # (none runs on this machine)
        (["--ray", "head:6379", "--workers", "2"], "--workers 2 with --ray head:6379"),
        (["--ray", ""], "--ray: expected a Ray cluster's address"),
    ):
        assert main(["study", "--config", path, "--no-progress", *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "ray" / "tiny" / "iid").exists()
    (tmp_path / "ray_test_hook.py").write_text(RAY_HOOK)
    monkeypatch.setenv("PYTHONPATH", ":".join([str(tmp_path), *sys.path]))  # the local instance's workers inherit it
    monkeypatch.setenv("FED_PLORA_TEST_RAY", str(tmp_path))
    init = ray.init
    monkeypatch.setattr(ray, "init", lambda **kw: init(**kw, runtime_env={"worker_process_setup_hook": "ray_test_hook.die_once"}))
    try:
        assert main(["study", "--config", path, "--ray", "local", "--workers", "2", "--only", "iid", "--no-progress"]) == 0
        assert not ray.is_initialized()  # the local instance is shut down
    finally:
        ray.shutdown()
    assert (tmp_path / "died").exists()
    # 8 trainings per cell run straight; the killed cell: 5 before it died, then fedit's 4 (fedplora not re-run)
    assert len((tmp_path / "trainings").read_text().split()) == 8 + 5 + 4
    ours = read_jsonl(tmp_path / "ray" / "tiny" / "results.jsonl")  # the rows --workers 2 gives (the test above)
    assert _stable(ours) == _stable(read_jsonl(straight / "results.jsonl"))[: 2 * len(METHODS)]
    assert "Cells finished: 2 of 4" in (tmp_path / "ray" / "tiny" / "report.md").read_text()
