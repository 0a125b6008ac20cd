"""The run guarantees under planted faults: every refusal comes before anything is written and names what
is wrong, no link is followed when writing, no checkpoint skips its checksums, and a run or cell killed at
any moment can be finished."""

import json
import os
import shutil

import pytest
import torch
from helpers import DATA, needs_data, tiny_config

from fed_plora.fl import resume_experiment, run_experiment
from fed_plora.fl.cli import main
from fed_plora.fl.config import ConfigError
from fed_plora.fl.data import DataError
from fed_plora.fl.run.experiment import RunFailed
from fed_plora.fl.run.rundir import RunDirectoryError
from fed_plora.fl.storage import InUseError, exclusive_lock, read_jsonl
from fed_plora.fl.study.config import MAX_SETTING_NAME, StudyError, load_study
from fed_plora.fl.study.runner import run_study

pytestmark = needs_data


def _tree(directory):
    """Every path under ``directory`` with its bytes (None for a folder or a link's own target)."""
    if not directory.exists():
        return None
    return {
        str(p.relative_to(directory)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture(scope="module")
def done_run(tiny_models, tmp_path_factory):
    """A finished 2-round FedIT run, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("runs")
    directory, _ = run_experiment(tiny_config(tiny_models, out, 'run.name="done"', 'methods.names=["fedit"]'), progress=False)
    return directory


def _copy(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name, symlinks=True)


# ------------------------------------------------------------------ refusals before anything is written


def _long_texts(path, labels, words=300):
    rows = [{"text": " ".join(f"word{i}{j}" for j in range(words)), "label": labels[i % len(labels)]} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ('model.extra_trainable=["nohead"]', r"model.extra_trainable: .*does not have: \['nohead'\]"),
        ("task.max_length=512", r"task.max_length = 512: model .* cannot take the run's longest input \(512 tokens\)"),
    ],
)
def test_a_model_that_cannot_take_the_run_is_refused_before_anything_is_written(tiny_models, tmp_path, override, message):
    """The backbone is loaded and run once on the run's longest input before the run directory exists (the
    tiny BERT has 128 positions)."""
    train = _long_texts(tmp_path / "long.jsonl", ["a", "b"])
    config = tiny_config(
        tiny_models,
        tmp_path,
        'run.name="never"',
        'task.name="custom"',
        f'task.train_file="{train}"',
        'federation.partition="iid"',
        "task.max_train_examples=20",
        "task.max_eval_examples=4",
        override,
    )
    with pytest.raises(ConfigError, match=message):
        run_experiment(config, progress=False)
    assert not (tmp_path / "never").exists()


def test_a_classifier_whose_head_has_other_labels_gets_a_fresh_head(tiny_models, tmp_path):
    """The tiny BERT is a 2-label classifier; a 3-label task of the user's own files trains a fresh head."""
    train = _long_texts(tmp_path / "three.jsonl", ["x", "y", "z"], words=5)
    config = tiny_config(
        tiny_models,
        tmp_path,
        'run.name="three"',
        'task.name="custom"',
        f'task.train_file="{train}"',
        'federation.partition="iid"',
        "task.max_train_examples=20",
        'methods.names=["fedit"]',
        "federation.rounds=1",
    )
    directory, _ = run_experiment(config, progress=False)
    assert [r["method"] for r in read_jsonl(directory / "metrics.jsonl")] == ["fedit"]


def test_an_unwritable_place_is_refused_before_anything_is_written(tiny_models, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out, name, message in [
        (blocker, "run", r"its parent .*file exists and is not a directory"),
        (tmp_path, "file", r"run directory .*file: the run directory exists and is not a directory"),
    ]:
        with pytest.raises(RunDirectoryError, match=message):
            run_experiment(tiny_config(tiny_models, out, f'run.name="{name}"'), progress=False)
    assert blocker.read_text() == "not a directory"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    config = tiny_config(tiny_models, tmp_path, 'run.name="never"')
    with pytest.raises(RunDirectoryError, match=r"is not writable \(permission denied\)"):
        run_experiment(config, progress=False)
    assert not (tmp_path / "never").exists()
    args = ["run", "--model", str(tiny_models / "bert"), "--data-dir", str(DATA), "--out-dir", str(blocker), "--no-progress"]
    assert main(args) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_out_dir_is_refused(tiny_models, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(RunDirectoryError, match="is not writable"):
        run_experiment(tiny_config(tiny_models, locked, 'run.name="never"'), progress=False)


def test_a_user_file_nested_too_deep_names_its_file_and_line(tiny_models, tmp_path):
    train = tmp_path / "deep.jsonl"
    train.write_text('{"text": "a", "label": 0}\n{"text": ' + "[" * 200_000 + "]" * 200_000 + ', "label": 1}\n')
    config = tiny_config(tiny_models, tmp_path, 'task.name="custom"', f'task.train_file="{train}"', 'federation.partition="iid"')
    with pytest.raises(DataError, match=r"deep.jsonl, line 2, character 200009: not valid JSON \(nested 200001 levels deep"):
        run_experiment(config, progress=False)


# ------------------------------------------------------------------ checkpoints, links, --overwrite


def test_a_checkpoint_stripped_of_its_checksums_is_refused(done_run, tmp_path):
    """Format 1 (before checksums) is read only in a run from before manifests; here it is a bypass."""
    run = _copy(done_run, tmp_path)
    index = run / "checkpoints" / "fedit.json"
    payload = json.loads(index.read_text())
    payload["format"] = 1
    for key in ("sha256", "tensors_sha256", "run"):
        payload.pop(key)
    index.write_text(json.dumps(payload))
    tensors = run / "checkpoints" / payload["tensors"]
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x10
    tensors.write_bytes(bytes(data))
    before = _tree(run)
    with pytest.raises(Exception, match=r"fedit.json: format 1 \(no checksums\) in run"):
        resume_experiment(run, progress=False)
    assert _tree(run) == before


def test_no_write_follows_a_link(done_run, tmp_path):
    """A plot planted as a link to a user's file: the resume replaces the link, never writes the file."""
    run = _copy(done_run, tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's notes")
    (run / "curves.png").unlink()
    (run / "curves.png").symlink_to(precious)
    resume_experiment(run, progress=False)
    assert precious.read_text() == "the user's notes"
    assert not (run / "curves.png").is_symlink() and (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_directory_that_is_a_link_is_refused_even_with_overwrite(done_run, tiny_models, tmp_path):
    other = _copy(done_run, tmp_path, "other")
    (tmp_path / "alias").symlink_to(other, target_is_directory=True)
    before = _tree(other)
    config = tiny_config(tiny_models, tmp_path, 'run.name="alias"', 'methods.names=["fedit"]')
    with pytest.raises(RunDirectoryError, match="is a link: a run directory is never one"):
        run_experiment(config, progress=False, overwrite=True)
    with pytest.raises(RunDirectoryError, match="is a link"):
        resume_experiment(tmp_path / "alias", progress=False)
    assert _tree(other) == before


def test_overwrite_refuses_a_folder_named_like_a_run_file_and_deletes_nothing(done_run, tiny_models, tmp_path):
    run = _copy(done_run, tmp_path)
    (run / "summary.md").unlink()
    (run / "summary.md").mkdir()
    (run / "summary.md" / "notes.txt").write_text("mine")
    before = _tree(run)
    config = tiny_config(tiny_models, tmp_path, 'run.name="run"', 'methods.names=["fedit"]')
    with pytest.raises(RunDirectoryError, match=r"holds files a run does not write \(.*summary.md\); nothing was deleted"):
        run_experiment(config, progress=False, overwrite=True)
    assert _tree(run) == before


def test_a_run_directory_in_use_is_refused_run_and_resume_alike(done_run, tiny_models, tmp_path, capsys):
    """While a process runs (or resumes) a run, another run or resume of that directory is refused and
    changes nothing, ``--overwrite`` included."""
    run = _copy(done_run, tmp_path)
    before = _tree(run)
    config = tiny_config(tiny_models, tmp_path, 'run.name="run"', 'methods.names=["fedit"]')
    with exclusive_lock(run, "fed-plora run"):
        assert main(["resume", str(run), "--no-progress"]) == 2
        with pytest.raises(InUseError, match=r"run is in use by another fed-plora run: wait for it to end"):
            run_experiment(config, progress=False, overwrite=True)
    assert "in use by another fed-plora run" in capsys.readouterr().err
    assert _tree(run) == before
    assert main(["resume", str(run), "--no-progress"]) == 0  # the lock is gone with its holder


def test_a_run_killed_while_it_started_is_run_again(done_run, tiny_models, tmp_path, capsys):
    """A directory holding only the start of a run (its manifest, written first) is replaced by a new run
    without ``--overwrite``; ``resume`` says so."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(done_run / "manifest.json", run / "manifest.json")
    assert main(["resume", str(run), "--no-progress"]) == 2
    assert "killed while it was being created" in capsys.readouterr().err
    directory, _ = run_experiment(tiny_config(tiny_models, tmp_path, 'run.name="run"', 'methods.names=["fedit"]'), progress=False)
    assert [r["round"] for r in read_jsonl(directory / "metrics.jsonl")] == [1, 2]


def test_a_method_whose_only_accepted_round_trained_at_lr_zero_failed(tiny_models, tmp_path):
    """lr = 1e6 diverges in round 1 (every update over the norm bound); round 2 of the cosine schedule trains
    at lr 0, its unchanged updates pass: the run still failed."""
    config = tiny_config(tiny_models, tmp_path, 'run.name="diverged"', 'methods.names=["fedit"]', "train.lr=1e6")
    with pytest.raises(RunFailed, match=r"every client of every round failed for fedit \(rounds at learning rate 0 aside\)"):
        run_experiment(config, progress=False)


# ------------------------------------------------------------------ studies


def _study(tmp_path, settings, head=""):
    (tmp_path / "base.toml").write_text('[task]\nname = "sst2"\n[federation]\nrounds = 3\n')
    path = tmp_path / "study.toml"
    path.write_text(f'[study]\nname = "s"\nbase = "base.toml"\nseeds = [0]\nout_dir = "{tmp_path / "out"}"\n{head}\n{settings}')
    return path


@pytest.mark.parametrize(
    "name", ["report.md", "results.jsonl", "metric.png", ".hidden", "x" * (MAX_SETTING_NAME + 1)], ids=lambda n: n[:12]
)
def test_a_setting_name_that_would_break_the_report_is_refused(tmp_path, name):
    with pytest.raises(StudyError, match=r"setting name .*: must be a plain directory name of at most 100 characters"):
        load_study(_study(tmp_path, f'[settings."{name}"]\n'))


def test_a_baseline_that_is_no_method_of_the_study_is_refused(tmp_path):
    with pytest.raises(StudyError, match=r"study.baseline = 'fedplroa': not a method of setting 'a'"):
        load_study(_study(tmp_path, "[settings.a]\n", head='baseline = "fedplroa"'))


def test_a_study_directory_in_use_is_refused(tmp_path, capsys):
    study = load_study(_study(tmp_path, "[settings.a]\n"))
    with exclusive_lock(study.directory, "fed-plora study"):
        with pytest.raises(InUseError, match="is in use by another fed-plora study"):
            run_study(study, progress=False)
        assert main(["study", "--config", str(study.path), "--report-only"]) == 2
    assert "in use by another fed-plora study" in capsys.readouterr().err
    assert not study.directory.exists()  # made for the lock, left empty: removed


def test_the_study_report_follows_no_link(tmp_path):
    study = load_study(_study(tmp_path, "[settings.a]\n"))
    study.directory.mkdir(parents=True)
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's notes")
    (study.directory / "report.md").symlink_to(precious)
    assert main(["study", "--config", str(study.path), "--report-only"]) == 0
    assert precious.read_text() == "the user's notes" and not (study.directory / "report.md").is_symlink()


# ------------------------------------------------------------------ Flower claims


def test_a_fractional_step_claim_is_rejected_not_truncated():
    pytest.importorskip("flwr")
    from flwr.app import MetricRecord, RecordDict

    from fed_plora.fl.flower.wire import read_reply, to_arrays
    from fed_plora.fl.rounds.validate import RejectedUpdate, check_claims
    from fed_plora.fl.strategies import ClientPlan, ClientUpdate, Factors

    stats = {"num-examples": 10, "loss": 0.5, "steps": 1.9, "tokens": 64, "train-seconds": 0.1, "seconds": 0.2}
    _, examples, train, _ = read_reply(RecordDict({"upload": to_arrays({}), "stats": MetricRecord(stats)}))
    assert train.steps == 1.9
    adapter = {"q": Factors(torch.zeros(2, 3), torch.zeros(4, 2))}
    plan = ClientPlan("fedit", 0, adapter, {"q": torch.tensor([0])}, {}, {})
    update = ClientUpdate(0, examples, adapter, plan.trained, {})
    with pytest.raises(RejectedUpdate, match="claims 1.9 local steps; the plan is 1"):
        check_claims(plan, update, train, 10, 1)
    train.steps, train.tokens = 1, 12.5
    with pytest.raises(RejectedUpdate, match="claims 12.5 tokens"):
        check_claims(plan, update, train, 10, 1)
