"""A run is data: a new run never destroys an old one and checks everything
before it writes; paths from files stay in the run directory; checkpoints and the run's manifest carry
checksums, and a resume refuses a damaged, changed or mismatched run without changing it; JSON is standard
and every JSON error names its file. Each test plants the fault and checks the error and that nothing
was lost or changed."""

import json
import math
import shutil

import pytest
import torch
from helpers import DATA, needs_data, stable, tiny_config
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fed_plora.fl import resume_experiment, run_experiment
from fed_plora.fl.cli import main
from fed_plora.fl.config import ConfigError
from fed_plora.fl.rounds.checkpoint import Checkpoint, CheckpointError, capture_rng, load_checkpoint, save_checkpoint
from fed_plora.fl.run.report import RunWriter
from fed_plora.fl.run.rundir import RunDirectoryError
from fed_plora.fl.storage import FileFormatError, digest_json, read_jsonl, sha256_bytes


def snapshot(directory):
    """Every file under ``directory``, by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _strict(text):
    """Parse as standard JSON: a bare NaN or Infinity raises."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- checkpoints on their own (no model)


def _checkpoint(rounds=1, method="fedplora"):
    records = [{"method": method, "round": k, "train_loss": 0.5, "faults": []} for k in range(1, rounds + 1)]
    tensors = {"layer.a": torch.randn(2, 3), "layer.b": torch.zeros(4, 2), "steps": torch.tensor([1, 2])}
    return Checkpoint(method, rounds, tensors, {"note": "meta"}, capture_rng(), records)


def _edit(index, change, rehash=True):
    """Change the checkpoint JSON ``index`` with ``change(payload)``; ``rehash``: recompute its checksum, as
    someone who edits it consistently would (so that the check behind the checksum is exercised)."""
    payload = json.loads(index.read_text())
    change(payload)
    if rehash:
        payload["sha256"] = digest_json({k: v for k, v in payload.items() if k != "sha256"})
    index.write_text(json.dumps(payload))


def _rename_round(payload, rounds, directory):
    old = directory / payload["tensors"]
    payload["rounds_done"], payload["tensors"] = rounds, f"fedplora.round{rounds}.safetensors"
    old.rename(directory / payload["tensors"])


def _write_tensors(path, tensors):
    data = save_tensors(tensors)
    path.write_bytes(data)
    return sha256_bytes(data)


def _nan_tensor(payload, directory, rehash):
    tensors = load_tensors((directory / payload["tensors"]).read_bytes())
    tensors["layer.a"][0, 0] = float("nan")
    digest = _write_tensors(directory / payload["tensors"], tensors)
    if rehash:
        payload["tensors_sha256"] = digest


PLANTED = {  # name: (plant(payload, directory), checksum recomputed, expected error)
    "rounds_done edited": (lambda p, d: p.update(rounds_done=2), False, "does not match its checksum"),
    "rounds_done edited consistently": (
        lambda p, d: _rename_round(p, 2, d),
        True,
        r"rounds_done = 2 but its records are rounds \[1\]",
    ),
    "records duplicated": (
        lambda p, d: (_rename_round(p, 2, d), p.update(records=p["records"] * 2)),
        True,
        r"rounds_done = 2 but its records are rounds \[1, 1\] \(expected rounds 1..2 of fedplora, once each\)",
    ),
    "records of another method": (
        lambda p, d: p.update(records=[{**p["records"][0], "method": "fedit"}]),
        True,
        r"records are rounds \[1\] \(expected rounds 1..1 of fedplora",
    ),
    "NaN in a tensor": (lambda p, d: _nan_tensor(p, d, rehash=False), False, "does not match the checksum"),
    "NaN in a tensor, rehashed": (lambda p, d: _nan_tensor(p, d, rehash=True), True, "tensor 'layer.a' holds non-finite values"),
    "another run's checkpoint": (lambda p, d: p.update(run="someone-else"), True, r"written by another run \('someone-else'"),
    "unknown format": (lambda p, d: p.update(format=7), True, "checkpoint format 7, this version reads 2"),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_a_damaged_or_edited_checkpoint_is_refused(tmp_path, name):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, _checkpoint(), run="run-id")
    assert load_checkpoint(directory, "fedplora", run="run-id").rounds_done == 1
    plant, rehash, message = PLANTED[name]
    _edit(directory / "fedplora.json", lambda payload: plant(payload, directory), rehash)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(directory, "fedplora", run="run-id")
    assert str(directory) in str(caught.value)  # the error names the file


def test_a_flipped_bit_in_the_tensor_file_is_refused(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, _checkpoint(), run="r")
    path = directory / "fedplora.round1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a value's bit, not the header's: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{path}: does not match the checksum in fedplora.json"):
        load_checkpoint(directory, "fedplora", run="r")


def test_a_checkpoint_that_is_not_json_names_its_file(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, _checkpoint(), run="r")
    (directory / "fedplora.json").write_text('{"format": 2, "method": ')
    with pytest.raises(CheckpointError, match=rf"checkpoint {directory / 'fedplora.json'}, line 1, column \d+: not valid JSON"):
        load_checkpoint(directory, "fedplora")


@pytest.mark.parametrize("rehash", [False, True])
def test_a_tensor_path_outside_the_checkpoint_directory_is_never_read_or_deleted(tmp_path, rehash):
    """A checkpoint JSON naming ``../../victim_file.txt``: a load refuses it, and the next save (which
    deletes the tensor file it supersedes) leaves the victim alone."""
    victim = tmp_path / "victim_file.txt"
    victim.write_text("precious")
    directory = tmp_path / "run" / "checkpoints"
    save_checkpoint(directory, _checkpoint(), run="r")
    _edit(directory / "fedplora.json", lambda p: p.update(tensors="../../victim_file.txt"), rehash)
    message = "names the tensor file '../../victim_file.txt', expected 'fedplora.round1.safetensors'" if rehash else "checksum"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory, "fedplora", run="r")
    save_checkpoint(directory, _checkpoint(rounds=2), run="r")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in directory.iterdir()) == ["fedplora.json", "fedplora.round2.safetensors"]
    assert load_checkpoint(directory, "fedplora", run="r").rounds_done == 2


def test_a_linked_tensor_file_is_refused(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, _checkpoint(), run="r")
    outside = tmp_path / "elsewhere.safetensors"
    (directory / "fedplora.round1.safetensors").rename(outside)
    (directory / "fedplora.round1.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="missing or not a plain file"):
        load_checkpoint(directory, "fedplora", run="r")


def test_a_checkpoint_before_checksums_still_reads(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, _checkpoint(), run="r")

    def legacy(payload):
        for key in ("sha256", "tensors_sha256", "run"):
            del payload[key]
        payload["format"] = 1

    _edit(directory / "fedplora.json", legacy, rehash=False)
    checkpoint = load_checkpoint(directory, "fedplora")  # a run from before manifests: its id is unknown
    assert checkpoint.format == 1 and checkpoint.rounds_done == 1
    with pytest.raises(CheckpointError, match=r"format 1 \(no checksums\) in run 'r'"):  # a run with an id checksums all
        load_checkpoint(directory, "fedplora", run="r")
    _edit(directory / "fedplora.json", lambda p: p.update(tensors="../x"), rehash=False)  # structure still checked
    with pytest.raises(CheckpointError, match="names the tensor file '../x'"):
        load_checkpoint(directory, "fedplora")


# ---------------------------------------------------------------- standard JSON


def test_non_finite_floats_are_written_as_strings_and_read_back(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.append({"method": "fedplora", "round": 1, "train_loss": math.nan, "agg_noise": math.inf, "init_noise": -math.inf})
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert _strict(line) == {
        "method": "fedplora",
        "round": 1,
        "train_loss": "NaN",
        "agg_noise": "Infinity",
        "init_noise": "-Infinity",
    }
    checkpoint = _checkpoint()
    checkpoint.records[0]["train_loss"] = math.nan
    save_checkpoint(tmp_path / "checkpoints", checkpoint)
    _strict((tmp_path / "checkpoints" / "fedplora.json").read_text())
    loaded = load_checkpoint(tmp_path / "checkpoints", "fedplora")
    assert math.isnan(loaded.records[0]["train_loss"])  # back as a float on resume


def test_a_damaged_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2,\n{"round": 3}\n')
    with pytest.raises(FileFormatError, match=rf"{path}, line 2, column \d+: not valid JSON"):
        read_jsonl(path)


# ---------------------------------------------------------------- new runs (tiny model)


def _cli_args(tiny_models, tmp_path, *extra):
    args = ["run", "--model", str(tiny_models / "bert"), "--data-dir", str(DATA), "--out-dir", str(tmp_path), "--name", "run"]
    args += ["--methods", "fedplora", "--rounds", "2", "--clients", "3", "--no-progress"]
    sets = ["model.rank=4", "federation.rank_choices=[1, 2, 4]", "task.max_train_examples=24", "task.max_eval_examples=4"]
    sets += ["task.max_length=16", "train.local_steps=1", "train.batch_size=4", "references.names=[]"]
    return args + [a for s in sets for a in ("--set", s)] + list(extra)


@needs_data
def test_a_new_run_never_destroys_an_old_one(tiny_models, tmp_path, capsys):
    assert main(_cli_args(tiny_models, tmp_path)) == 0
    run = tmp_path / "run"
    before = snapshot(run)
    assert {"manifest.json", "config.json", "clients.json", "metrics.jsonl", "checkpoints/fedplora.json"} <= set(before)
    refusals = [
        (["--task", "colaa"], "task.name = 'colaa': must be one of"),  # the typo of the issue
        ([], f"run directory {run} already holds files"),
        (["--seed", "1"], "pass --overwrite to replace it"),
        (["--overwrite", "--data-dir", str(tmp_path / "nowhere")], "is not a directory"),  # checked before deleting
        (["--overwrite", "--model", str(tmp_path / "no-model")], "model.name = "),
        (["--overwrite", "--set", "task.max_length=2"], "task.max_length = 2: too short for the tokenizer"),
    ]
    for extra, message in refusals:
        assert main(_cli_args(tiny_models, tmp_path, *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert snapshot(run) == before, extra
    (run / "notes.txt").write_text("mine")
    assert main(_cli_args(tiny_models, tmp_path, "--overwrite")) == 2
    assert "holds files a run does not write" in capsys.readouterr().err and snapshot(run) == {**before, "notes.txt": b"mine"}
    (run / "notes.txt").unlink()
    # Asked for: the old run goes, checkpoints included (a method the new run does not have, too).
    assert main(_cli_args(tiny_models, tmp_path, "--overwrite", "--seed", "1", "--methods", "fedit", "--rounds", "1")) == 0
    files = set(snapshot(run))
    assert "checkpoints/fedplora.json" not in files and "checkpoints/fedplora.round2.safetensors" not in files
    assert {"checkpoints/fedit.json", "checkpoints/fedit.round1.safetensors"} <= files
    assert json.loads((run / "config.json").read_text())["run"]["seed"] == 1
    assert [r["method"] for r in read_jsonl(run / "metrics.jsonl")] == ["fedit"]


@needs_data
def test_a_run_that_cannot_start_creates_nothing(tiny_models, tmp_path):
    for override, error, message in [
        (f'model.name="{tmp_path / "missing"}"', ConfigError, "model.name = "),
        (f'task.data_dir="{tmp_path / "missing"}"', FileNotFoundError, "is not a directory"),
        ("task.max_length=2", ConfigError, "task.max_length = 2: too short"),
        ('federation.partition="category"', ConfigError, "federation.partition = 'category' on task cola"),
    ]:
        with pytest.raises(error, match=message):
            run_experiment(tiny_config(tiny_models, tmp_path, 'run.name="never"', override), progress=False)
        assert not (tmp_path / "never").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.device = 'cuda': no CUDA device"):
            run_experiment(tiny_config(tiny_models, tmp_path, 'run.name="never"', 'run.device="cuda"'), progress=False)
        assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- resume of a changed run (tiny model)


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    """A finished 2-round Fed-PLoRA run, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("runs")
    directory, _ = run_experiment(
        tiny_config(tiny_models, out, 'run.name="done"', 'methods.names=["fedplora"]', "task.max_train_examples=24"),
        progress=False,
    )
    return directory


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _json_edit(path, change):
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload, indent=2))


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


RESUME_FAULTS = {  # name: (plant(run dir), expected error)
    "seed edited in config.json": (
        lambda d: _json_edit(d / "config.json", lambda c: c["run"].update(seed=5)),
        r"config.json differs from the config the run was started with \(run.seed: 0 \(run\) -> 5\)",
    ),
    "rounds edited in config.json": (
        lambda d: _json_edit(d / "config.json", lambda c: c["federation"].update(rounds=4)),
        r"\(federation.rounds: 2 \(run\) -> 4\)",
    ),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{"), r"config.json, line 1, column 2: not valid JSON"),
    "clients.json edited": (
        lambda d: _json_edit(d / "clients.json", lambda c: c[0].update(examples=1)),
        r"clients.json: changed since the run was written",
    ),
    "manifest.json edited": (
        lambda d: _json_edit(d / "manifest.json", lambda m: m["config"]["run"].update(seed=5)),
        r"manifest.json: its content does not match its checksum",
    ),
    "manifest.json removed": (
        lambda d: (d / "manifest.json").unlink(),
        r"manifest.json is missing but .*fedplora.json was written with checksums",
    ),
    "rounds_done edited": (
        lambda d: _json_edit(d / "checkpoints" / "fedplora.json", lambda c: c.update(rounds_done=1)),
        r"fedplora.json: its content does not match its checksum",
    ),
    "a flipped bit in the tensors": (
        lambda d: _flip_bit(d / "checkpoints" / "fedplora.round2.safetensors"),
        r"fedplora.round2.safetensors: does not match the checksum",
    ),
    "the tensor file is deleted": (
        lambda d: (d / "checkpoints" / "fedplora.round2.safetensors").unlink(),
        r"its tensor file .*fedplora.round2.safetensors is missing",
    ),
}


@needs_data
@pytest.mark.parametrize("name", list(RESUME_FAULTS))
def test_resume_refuses_a_changed_or_damaged_run_and_changes_nothing(finished_run, tmp_path, name):
    run = _copy(finished_run, tmp_path)
    plant, message = RESUME_FAULTS[name]
    plant(run)
    before = snapshot(run)
    with pytest.raises((RunDirectoryError, CheckpointError), match=message):
        resume_experiment(run, progress=False)
    assert snapshot(run) == before


@needs_data
def test_resume_command_exits_2_on_a_changed_run(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    _json_edit(run / "config.json", lambda c: c["run"].update(seed=5))
    assert main(["resume", str(run), "--no-progress"]) == 2
    assert "run.seed: 0 (run) -> 5" in capsys.readouterr().err


@needs_data
def test_resume_with_other_data_is_refused_and_the_partition_record_kept(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = snapshot(run)
    other = tmp_path / "other" / "glue" / "CoLA"
    other.mkdir(parents=True)
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv"):
        lines = (DATA / "glue" / "CoLA" / name).read_text().splitlines(keepends=True)
        (other / name).write_text("".join(line.upper() for line in lines))  # the same labels, other sentences
    with pytest.raises(RunDirectoryError, match=r"the data found now are not the run's \(train_sha256 .* \(run\) -> "):
        resume_experiment(run, progress=False, data_dir=str(tmp_path / "other"))
    assert snapshot(run) == before  # clients.json, the partition record, untouched


@needs_data
def test_resume_with_the_same_data_moved_and_of_an_intact_run_succeed(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    moved = tmp_path / "moved" / "glue" / "CoLA"
    shutil.copytree(DATA / "glue" / "CoLA", moved)
    resume_experiment(run, progress=False, data_dir=str(tmp_path / "moved"))
    assert stable(read_jsonl(run / "metrics.jsonl")) == stable(read_jsonl(finished_run / "metrics.jsonl"))
    for name in ("manifest.json", "config.json", "clients.json"):
        assert (run / name).read_bytes() == (finished_run / name).read_bytes()
    for name in ("manifest.json", "config.json", "clients.json", "summary.json", "checkpoints/fedplora.json"):
        _strict((run / name).read_text())  # standard JSON everywhere
