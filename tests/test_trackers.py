"""log.trackers: W&B (offline) and MLflow (a file store) get the scalars metrics.jsonl gets and the config once per run,
keep their files in the run directory, and a --resume continues the same tracker runs. Offline and local only; the
test's HOME, W&B and MLflow directories are its own."""

import json
import os
import struct
import time
from pathlib import Path

import pytest

from pst_dist import registry
from pst_dist.config import ConfigError, load_config
from pst_dist.registry import Entry
from pst_dist.train import train, write_run_header

from .conftest import TINY, run_cli, signal_after_checkpoint


@pytest.fixture
def own_dirs(tmp_path, monkeypatch) -> Path:
    """Everything W&B and MLflow would write outside the run directory goes under tmp_path/home."""
    home = tmp_path / "home"
    for var, sub in (("HOME", ""), ("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "wandb_config"),
                     ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_DATA_DIR", "wandb_data"),
                     ("WANDB_ARTIFACT_DIR", "wandb_artifacts"), ("XDG_CONFIG_HOME", "config"),
                     ("XDG_CACHE_HOME", "cache")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "default_mlruns").as_uri())  # must stay unused
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return home


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf records behind a 7-byte
    header, in 32 KiB blocks of chunks with 7-byte headers: crc32, length, type full | first | middle | last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{run_file}: not a W&B run file"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        chunk += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_exit_codes(run_dir: Path, wait_s: float = 20) -> list[int]:
    """The exit codes the run directory's one W&B run recorded; W&B's service writes the record after finish()
    returns, so this waits for it (up to ``wait_s``)."""
    (f,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            codes = [r.exit.exit_code for r in wandb_records(f) if r.WhichOneof("record_type") == "exit"]
        except Exception:  # a record half written as it was read
            if time.monotonic() > deadline:
                raise
            codes = []
        if codes or time.monotonic() > deadline:
            return codes
        time.sleep(0.2)


def wandb_history(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """{step: scalars} and the config, from every offline W&B run file under ``run_dir``."""
    history, config = {}, {}
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(items.pop("_step"), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
            elif kind in ("run", "config"):  # the config a run starts with, and later updates
                updates = r.run.config.update if kind == "run" else r.config.update
                config.update({i.key: json.loads(i.value_json) for i in updates})
    return history, config


def jsonl(run_dir: Path) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row.pop("step"), {}).update(row)
    return by_step


def test_wandb_and_mlflow_get_the_runs_metrics_and_config_and_resume(tmp_path, own_dirs):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = [*TINY, "--data.synthetic_train=128", "--train.epochs=1", "--log.tensorboard=false",
            '--log.trackers=["wandb", "mlflow"]', "--log.project=pst-test", f"--log.run_dir={run_dir}"]
    train(load_config(None, args))
    ids = json.loads((run_dir / "trackers.json").read_text())
    train(load_config(None, [*args, "--train.epochs=2"]), resume=True)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids, "the resume started new tracker runs"
    want = jsonl(run_dir)
    test_acc = {s: v["eval/test_acc"] for s, v in want.items() if "eval/test_acc" in v}
    assert len(test_acc) == 2, "expected one test accuracy per epoch in metrics.jsonl"

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "pst-test"
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "eval/test_acc")} == test_acc
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")} == \
        {s: v["train/loss"] for s, v in want.items() if "train/loss" in v}
    params = run.data.params
    assert params["train.epochs"] == "1" and params["model.width"] == "0.125", "the config is logged once, at start"
    assert params["log.trackers"] == "['wandb', 'mlflow']"

    history, config = wandb_history(run_dir)
    assert {s: h["eval/test_acc"] for s, h in history.items() if "eval/test_acc" in h} == test_acc
    assert config["train"]["epochs"] == 1 and config["model"]["width"] == 0.125
    assert all(f.name.endswith(ids["wandb"] + ".wandb") for f in run_dir.glob("wandb/offline-run-*/run-*.wandb"))

    assert not (tmp_path / "default_mlruns").exists(), "MLflow wrote to MLFLOW_TRACKING_URI, not the run's store"
    assert not list(Path.cwd().glob("mlruns")) and not (Path.cwd() / "wandb").exists()
    outside = [p for p in own_dirs.rglob("*") if p.is_file() and "wandb_cache" not in p.parts]
    assert not outside, f"trackers wrote outside the run directory: {outside}"


@pytest.mark.slow  # the main tracker test covers MLflow's default store; this one only the URI key
def test_mlflow_uri_names_the_store(tmp_path, own_dirs, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store named by the user: their opt-in
    store = (tmp_path / "store").as_uri()
    run_dir = tmp_path / "run"
    train(load_config(None, [*TINY, "--train.epochs=1", "--log.tensorboard=false", '--log.trackers=["mlflow"]',
                             f"--log.mlflow_uri={store}", f"--log.run_dir={run_dir}"]))
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert MlflowClient(tracking_uri=store).get_metric_history(run_id, "eval/test_acc")
    assert not (run_dir / "mlruns").exists()


def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch):
    entry = registry.TRACKERS["wandb"]
    monkeypatch.setitem(registry.TRACKERS, "wandb", Entry(entry.target, entry.doc, data={
        "package": "no_such_package_pst_dist", "extra": "wandb"}))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"pip install 'pst-dist\[wandb\]'"):
        train(load_config(None, [*TINY, '--log.trackers=["wandb"]', f"--log.run_dir={run_dir}"]))
    assert not run_dir.exists(), "the refused run wrote files"
    with pytest.raises(ConfigError, match="log.trackers"):
        load_config(None, ['--log.trackers=["tensorboardx"]'])


def test_overwrite_removes_a_trackers_folder_only_when_it_holds_the_recorded_run(tmp_path):
    """--overwrite: wandb/ and mlruns/ go only when they hold the tracker runs trackers.json records; a user's own
    (a run without trackers, or one whose MLflow logged to a server) stays."""
    from pst_dist.rundir import remove_run_files

    def run_dir(name: str, ids: dict | None) -> Path:
        d = tmp_path / name
        for f in ("wandb/offline-run-20250101_000000-abc123/run-abc123.wandb", "mlruns/0/f00d/meta.yaml"):
            (d / f).parent.mkdir(parents=True)
            (d / f).write_text("x")
        write_run_header(d, load_config(None))  # a pst-dist run's record: meta.json and config.toml
        if ids is not None:
            (d / "trackers.json").write_text(json.dumps(ids))
        return d

    theirs = run_dir("theirs", None)
    assert sorted(remove_run_files(theirs)) == ["config.toml", "meta.json"]
    assert (theirs / "wandb").is_dir() and (theirs / "mlruns").is_dir()
    server = run_dir("server", {"wandb": "zzz999", "mlflow": "beef"})  # ids of runs that are not in these folders
    assert sorted(remove_run_files(server)) == ["config.toml", "meta.json", "trackers.json"]
    assert (server / "wandb").is_dir() and (server / "mlruns").is_dir()
    ours = run_dir("ours", {"wandb": "abc123", "mlflow": "f00d"})
    assert sorted(remove_run_files(ours)) == ["config.toml", "meta.json", "mlruns", "trackers.json", "wandb"]
    assert sorted(p.name for p in ours.iterdir()) == []


def test_a_run_never_logs_into_a_trackers_folder_that_holds_no_run_it_recorded(tmp_path):
    """A user's mlruns/ or wandb/ in a run directory is theirs: a run that would log into it (and so make it look
    like its own to a later --overwrite, which would remove it) is refused; the run's own folders are reused."""
    from pst_dist.rundir import RunDirError, check_run_dir

    for tracker, folder, entry, run_id in (("mlflow", "mlruns", "1/c0ffee/meta.yaml", "c0ffee"),
                                           ("wandb", "wandb", "offline-run-20250101_000000-myrun/x.wandb", "myrun")):
        d = tmp_path / tracker
        (d / folder / entry).parent.mkdir(parents=True)
        (d / folder / entry).write_text("the user's")
        cfg = load_config(None, [f"--log.run_dir={d}", f'--log.trackers=["{tracker}"]'])
        write_run_header(d, load_config(None, [f"--log.run_dir={d}"]))  # a run, no trackers
        for resume, overwrite in ((False, True), (True, False)):
            with pytest.raises(RunDirError, match=f"holds {folder}/, but no {tracker} run this run recorded"):
                check_run_dir(cfg, resume=resume, overwrite=overwrite)
        (d / "trackers.json").write_text(json.dumps({tracker: "gone"}))  # a recorded run the store lost
        if tracker == "mlflow":  # MLflow cannot continue a run its store lost
            with pytest.raises(RunDirError, match="the mlflow run 'gone' its trackers.json records is not in"):
                check_run_dir(cfg, resume=True, overwrite=False)
        else:  # W&B starts the recorded id again (its offline folder cleaned by `wandb sync --clean`)
            check_run_dir(cfg, resume=True, overwrite=False)
        assert check_run_dir(cfg, resume=False, overwrite=True) == {}  # this tracker logged here before
        (d / "trackers.json").write_text(json.dumps({tracker: run_id}))  # the run's own: --overwrite removes it
        assert check_run_dir(cfg, resume=False, overwrite=True) == {}
        assert (d / folder / entry).read_text() == "the user's"


def test_overwrite_refuses_a_trackers_folder_that_holds_runs_it_did_not_record(tmp_path):
    """A user's run logged into the run's own mlruns/ or wandb/ is theirs: --overwrite (which removes the folder) is
    refused naming it, and nothing is removed; the run's own entries (a W&B resume's second folder of the same id,
    MLflow's trash) do not count."""
    from pst_dist.rundir import RunDirError, check_run_dir

    for tracker, folder, run_id, ours, theirs in (
            ("mlflow", "mlruns", "c0ffee", ["1/c0ffee/meta.yaml", "1/meta.yaml", ".trash/d1/meta.yaml"],
             "1/beef/meta.yaml"),
            ("wandb", "wandb", "myrun", ["offline-run-20250101_000000-myrun/x.wandb",
                                         "offline-run-20250102_000000-myrun/y", "debug.log"],
             "run-20250103_000000-other/z.wandb")):
        d = tmp_path / tracker
        for entry in ours:
            (d / folder / entry).parent.mkdir(parents=True, exist_ok=True)
            (d / folder / entry).write_text("the run's")
        cfg = load_config(None, [f"--log.run_dir={d}", f'--log.trackers=["{tracker}"]'])
        write_run_header(d, cfg)
        (d / "trackers.json").write_text(json.dumps({tracker: run_id, "made_here": [folder]}))
        assert check_run_dir(cfg, resume=False, overwrite=True) == {}
        (d / folder / theirs).parent.mkdir(parents=True)
        (d / folder / theirs).write_text("the user's")
        other = theirs.rsplit("/", 1)[0]
        with pytest.raises(RunDirError, match=f"{folder}/ holds {tracker} runs its trackers.json does not record "
                                               f"\\({other}: a user's"):
            check_run_dir(cfg, resume=False, overwrite=True)
        assert check_run_dir(cfg, resume=True, overwrite=False) == {}  # a resume removes nothing
        assert (d / folder / theirs).read_text() == "the user's"


def test_a_tracker_that_fails_to_open_leaves_no_folder_an_overwrite_cannot_replace(tmp_path, own_dirs, monkeypatch):
    """MLflow opens (making mlruns/), then W&B fails: trackers.json already says mlruns/ is the run's, so the next
    --overwrite replaces it (before, it was refused as a store pst-dist did not make)."""
    from pst_dist import tracking

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    args = [*TINY, "--data.synthetic_train=128", "--train.epochs=1", "--log.tensorboard=false",
            '--log.trackers=["mlflow", "wandb"]', f"--log.run_dir={tmp_path / 'r'}"]
    init = tracking.WandbTracker.__init__

    def no_key(self, *a):
        raise RuntimeError("No API key configured")

    monkeypatch.setattr(tracking.WandbTracker, "__init__", no_key)
    with pytest.raises(tracking.TrackerError, match="wandb could not open a new run"):
        train(load_config(None, args))
    assert (tmp_path / "r" / "mlruns").is_dir()
    assert json.loads((tmp_path / "r" / "trackers.json").read_text())[tracking.MADE] == ["mlruns", "wandb"]
    monkeypatch.setattr(tracking.WandbTracker, "__init__", init)
    r = run_cli("train", *args, "--overwrite")  # its own process: MLflow keeps one store per URI in a process
    assert r.returncode == 0, r.stderr[-3000:]
    ids = json.loads((tmp_path / "r" / "trackers.json").read_text())
    assert [p.name for p in (tmp_path / "r" / "mlruns").glob("*/*") if p.is_dir()] == [ids["mlflow"]]


def test_a_tracker_that_opened_is_recorded_before_the_next_one_fails(tmp_path, own_dirs, monkeypatch):
    """W&B opens, then MLflow (on a server: no folder of its own to record first) fails: trackers.json already holds
    W&B's id, so its run in wandb/ is the run's and the next --overwrite replaces it."""
    from pst_dist import tracking

    args = [*TINY, "--data.synthetic_train=128", "--train.epochs=1", "--log.tensorboard=false",
            '--log.trackers=["wandb", "mlflow"]', f"--log.mlflow_uri={(tmp_path / 'server').as_uri()}",
            f"--log.run_dir={tmp_path / 'r'}"]

    def unreachable(self, *a):
        raise ConnectionError("the server does not answer")

    monkeypatch.setattr(tracking.MlflowTracker, "__init__", unreachable)
    with pytest.raises(tracking.TrackerError, match="mlflow could not open a new run"):
        train(load_config(None, args))
    ids = json.loads((tmp_path / "r" / "trackers.json").read_text())
    assert tracking.unrecorded_runs(tmp_path / "r", "wandb", ids["wandb"]) == []
    assert tracking.holds_tracker_run(tmp_path / "r", "wandb", ids["wandb"])
    monkeypatch.undo()
    train(load_config(None, [*args, '--log.trackers=["wandb"]']), overwrite=True)
    new = json.loads((tmp_path / "r" / "trackers.json").read_text())
    assert new["wandb"] != ids["wandb"] and not tracking.holds_tracker_run(tmp_path / "r", "wandb", ids["wandb"])
    assert tracking.holds_tracker_run(tmp_path / "r", "wandb", new["wandb"])  # replaced by the new run's


def test_a_resume_whose_recorded_mlflow_run_is_gone_is_refused_naming_it(tmp_path, own_dirs, monkeypatch):
    import shutil

    from pst_dist.rundir import RunDirError
    from pst_dist.tracking import TrackerError, open_trackers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    args = [*TINY, "--data.synthetic_train=128", "--log.tensorboard=false", '--log.trackers=["mlflow"]',
            f"--log.run_dir={tmp_path / 'r'}"]
    train(load_config(None, [*args, "--train.epochs=1"]))
    run_id = json.loads((tmp_path / "r" / "trackers.json").read_text())["mlflow"]
    [gone] = (tmp_path / "r" / "mlruns").glob(f"*/{run_id}")
    shutil.rmtree(gone)  # deleted from the store (the MLflow UI, a cleanup)
    with pytest.raises(RunDirError, match=f"the mlflow run '{run_id}' its trackers.json records is not in its mlruns"):
        train(load_config(None, [*args, "--train.epochs=2"]), resume=True)
    with pytest.raises(TrackerError, match=f"mlflow could not open the run '{run_id}' recorded in"):  # a server's
        open_trackers(tmp_path / "r", load_config(None, args))


def test_a_resume_whose_tracker_fails_to_open_leaves_the_runs_record_as_it_was(tmp_path, own_dirs, monkeypatch):
    """config.toml and meta.json are rewritten, metrics.jsonl rolled back and TensorBoard's purging writer opened only
    once the trackers are open: a refused resume with a changed train.epochs does not record a config that never
    trained, nor drop the rows logged after the checkpoint."""
    from pst_dist import tracking

    run_dir = tmp_path / "r"
    args = [*TINY, "--data.synthetic_train=128", f"--log.run_dir={run_dir}"]
    train(load_config(None, [*args, "--train.epochs=1"]))
    with open(run_dir / "metrics.jsonl", "a") as f:  # a row past the checkpoint: a resume drops it, a refused one not
        f.write(json.dumps({"step": 10**6, "train/loss": 1.0}) + "\n")
    before = {f: (run_dir / f).read_bytes() for f in ("config.toml", "meta.json", "metrics.jsonl")}
    tb = sorted(p.name for p in (run_dir / "tb").iterdir())

    def no_key(self, *a):
        raise RuntimeError("No API key configured")

    monkeypatch.setattr(tracking.WandbTracker, "__init__", no_key)
    with pytest.raises(tracking.TrackerError, match="wandb could not open a new run"):
        train(load_config(None, [*args, "--train.epochs=2", '--log.trackers=["wandb"]']), resume=True)
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in (run_dir / "tb").iterdir()) == tb  # no event file opened with its purge_step


def test_a_resume_from_an_earlier_checkpoint_logs_each_step_once(tmp_path, own_dirs):
    """The run goes on past its last checkpoint, then resumes from it and logs those steps again: metrics.jsonl rolls
    back, TensorBoard purges the earlier files' later steps (purge_step), MLflow (which cannot delete a point) skips
    the steps it holds. Each shows every step once, with metrics.jsonl's values (bit-exact on the CPU)."""
    import shutil

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = [*TINY, "--data.synthetic_train=128", "--train.epochs=1", '--log.trackers=["mlflow"]',
            f"--log.run_dir={run_dir}"]
    train(load_config(None, args))
    shutil.copy(run_dir / "checkpoint.pt", tmp_path / "epoch1.pt")
    train(load_config(None, [*args, "--train.epochs=2"]), resume=True)
    shutil.copy(tmp_path / "epoch1.pt", run_dir / "checkpoint.pt")  # as if epoch 2's checkpoint had been lost
    train(load_config(None, [*args, "--train.epochs=2"]), resume=True)
    want = jsonl(run_dir)
    keys = ("train/loss", "eval/test_acc")
    expected = {k: sorted((s, v[k]) for s, v in want.items() if k in v) for k in keys}
    assert len(expected["eval/test_acc"]) == 2
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    for k in keys:
        assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) == expected[k], k
        got = [(e.step, e.value) for e in tb.Scalars(k)]
        assert sorted(s for s, _ in got) == [s for s, _ in expected[k]], k  # each step once
        assert all(abs(v - dict(expected[k])[s]) < 1e-6 for s, v in got), k  # float32 in the event files


def test_a_run_that_fails_closes_its_tracker_runs_and_the_next_run_in_the_process_gets_its_own(tmp_path, own_dirs):
    """A bench or a search trains run after run in one process: a run that fails (here in its epoch hook) ends its
    W&B run with exit code 1 and its MLflow run FAILED, and puts back torch's thread count; the next run logs into
    tracker runs of its own, not the failed run's, nor one the process had open before (``reinit="create_new"``)."""
    import torch
    import wandb
    from mlflow.tracking import MlflowClient

    def hook(*_args):
        raise RuntimeError("the hook fails")

    args = [*TINY, "--data.synthetic_train=128", "--train.epochs=1", "--log.tensorboard=false",
            '--log.trackers=["wandb", "mlflow"]', "--log.project=pst-test"]
    threads = torch.get_num_threads()
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(RuntimeError, match="the hook fails"):
        train(load_config(None, [*args, f"--train.threads={threads + 1}", f"--log.run_dir={a}"]), on_epoch=hook)
    assert torch.get_num_threads() == threads
    outer = wandb.init(project="outer", dir=str(tmp_path), mode="offline")  # the caller's own, active
    try:
        train(load_config(None, [*args, "--train.seed=7", f"--log.run_dir={b}"]))
    finally:
        outer.finish()
    ids = {d.name: json.loads((d / "trackers.json").read_text()) for d in (a, b)}
    assert len({ids["a"]["wandb"], ids["b"]["wandb"], outer.id}) == 3
    for d, status, code in ((a, "FAILED", 1), (b, "FINISHED", 0)):
        run = MlflowClient(tracking_uri=(d / "mlruns").as_uri()).get_run(ids[d.name]["mlflow"])
        assert run.info.status == status, d.name
        assert wandb_exit_codes(d) == [code], d.name
        history, config = wandb_history(d)
        want = {s: v["eval/test_acc"] for s, v in jsonl(d).items() if "eval/test_acc" in v}
        assert {s: h["eval/test_acc"] for s, h in history.items() if "eval/test_acc" in h} == want, d.name
        assert config["train"]["seed"] == (7 if d == b else 0)


def test_a_tracker_that_cannot_open_or_close_never_hides_the_runs_error_nor_leaves_a_run_open(
        tmp_path, own_dirs, monkeypatch, capsys):
    """A tracker that cannot open (an MLflow store URI it does not know) ends the W&B run opened before it, failed;
    one that cannot close after the run's error (its server gone) is reported, the other trackers still close, and
    the run's own error is the one raised."""
    from pst_dist import tracking

    args = [*TINY, "--data.synthetic_train=128", "--train.epochs=1", "--log.tensorboard=false",
            "--log.project=pst-test"]

    def open_files(under: Path) -> list[str]:  # this process's open files there
        fds = (Path("/proc/self/fd") / n for n in os.listdir("/proc/self/fd"))
        return [t for t in (os.path.realpath(fd) for fd in fds) if t.startswith(str(under.resolve()))]

    a = tmp_path / "a"
    with pytest.raises(Exception, match="bogus"):
        train(load_config(None, [*args, '--log.trackers=["wandb", "mlflow"]', "--log.mlflow_uri=bogus://nowhere",
                                 "--log.tensorboard=true", f"--log.run_dir={a}"]))
    assert wandb_exit_codes(a) == [1]
    assert not open_files(a), "metrics.jsonl or TensorBoard's event file left open"

    def close(self, failed=False):
        raise ConnectionError("the tracking server is gone")

    def hook(*_args):
        raise RuntimeError("the hook fails")

    monkeypatch.setattr(tracking.MlflowTracker, "close", close)
    b = tmp_path / "b"
    with pytest.raises(RuntimeError, match="the hook fails"):
        train(load_config(None, [*args, '--log.trackers=["mlflow", "wandb"]', f"--log.run_dir={b}"]), on_epoch=hook)
    assert "the tracking server is gone" in capsys.readouterr().err
    assert wandb_exit_codes(b) == [1]
    assert not open_files(b)

    c = tmp_path / "c"  # a run that trains to the end but cannot close its MLflow run: W&B closes, then it raises
    with pytest.raises(ConnectionError, match="the tracking server is gone"):
        train(load_config(None, [*args, '--log.trackers=["mlflow", "wandb"]', f"--log.run_dir={c}"]))
    assert json.loads((c / "summary.json").read_text())["status"] == "finished"
    assert wandb_exit_codes(c) == [0]


def test_sigterm_ends_the_run_as_ctrl_c_does_and_marks_its_tracker_run_failed(tmp_path, own_dirs, monkeypatch):
    """SIGTERM (torchrun ending the other ranks after one failed, a preemption, kill): one line, exit 143, the last
    checkpoint kept and the MLflow run FAILED (before, Python died at once and left it RUNNING)."""
    import signal

    import torch
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the run's own file store, read here as the run sets it
    run_dir = tmp_path / "r"
    out = signal_after_checkpoint([*TINY, "--data.synthetic_train=128", "--train.epochs=200", "--log.tensorboard=false",
                                   '--log.trackers=["mlflow"]', f"--log.run_dir={run_dir}"], run_dir, signal.SIGTERM)
    stderr = out.stderr
    assert out.returncode == 143 and "terminated (SIGTERM)" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["epoch"] >= 1
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri()).get_run(run_id).info.status == "FAILED"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_under_metrics_jsonl_names_the_file(tmp_path):
    """A write's ENOSPC carries no file name (was: "No space left on device (OSError)", naming nothing)."""
    from pst_dist.metrics import Metrics

    m = Metrics(tmp_path, enabled=True, tensorboard=False)
    m._file.close()
    m._file = open("/dev/full", "a", encoding="utf-8")  # noqa: SIM115 - closed by Metrics.close
    with pytest.raises(OSError) as e:
        m.log(1, {"loss": 0.5})
    assert e.value.errno == 28 and e.value.filename == "/dev/full"
    m.close(failed=True)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_under_tensorboard_is_one_error_naming_its_folder_not_a_thread_traceback(tmp_path):
    """TensorBoard writes from a thread of its own: its ENOSPC was printed as that thread's traceback ("Exception in
    thread ...") before the run's own thread raised it again, naming no file. (In a process of its own: pytest
    catches threads' exceptions itself.)"""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from pathlib import Path
        from pst_dist.metrics import Metrics

        run = Path({str(tmp_path)!r})
        m = Metrics(run, enabled=True, tensorboard=True)
        events = next((run / "tb").glob("events.out.tfevents.*"))
        events.unlink()
        events.symlink_to("/dev/full")  # TensorBoard opens its event file again for each write
        try:
            for step in range(20000):  # the thread fails at its first write; a later call raises it here
                m.log(step, {{"loss": 0.5, "acc": 0.25}})
        except OSError as e:
            print("raised", e.errno, e.filename)
        m.close(failed=True)
        other = run / "other"  # one scalar, then the run's end: close raises the thread's error
        m = Metrics(other, enabled=True, tensorboard=True)
        events = next((other / "tb").glob("events.out.tfevents.*"))
        events.unlink()
        events.symlink_to("/dev/full")
        m.log(0, {{"loss": 0.5}})
        try:
            m.close()
        except OSError as e:
            print("closing raised", e.errno, e.filename)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.splitlines() == [f"raised 28 {tmp_path / 'tb'}",
                                                           f"closing raised 28 {tmp_path / 'other' / 'tb'}"], \
        (p.stdout, p.stderr)
    assert "Exception in thread" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]


@pytest.mark.multiproc
def test_a_multi_rank_run_leaves_no_wandb_temporary_folders(tmp_path, own_dirs):
    """wandb makes two temporary folders when imported and removes them at the interpreter's exit; the ranks of a
    multi-process run end with os._exit (skipping a teardown that can abort), which left them in the temp dir."""
    import subprocess
    import sys

    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pst_dist.cli",
           "train", *TINY, "--train.epochs=1", "--log.tensorboard=false", '--log.trackers=["wandb"]',
           f"--log.run_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "wandb was not used"
    assert not sorted(p.name for p in temp.glob("*wandb*")), "left in the temp dir"
