import copy
import json
import os
from pathlib import Path

import pytest
import torch

from pst_dist.checkpoint import CheckpointError, load_checkpoint
from pst_dist.config import load_config
from pst_dist.metrics import KERNEL_ENV, machine_facts
from pst_dist.train import all_finite, build_optimizer, train, write_run_header

from .conftest import TINY, run_cli

PST = ('--schedule.stages=[{name="warm",epochs=2,trigger={kind="train_acc",threshold=0.0},'
       'loss={ce=1.0,view_ce=0.5}},{name="mid",epochs=1.5,freeze=[0,1],reinit_head=true,'
       'loss={ce=0.5,view_ce=1.0,consistency=1.0,cluster_penalty=0.1,cluster_group=2}},'
       '{name="late",group_mults={"0"=0.1,"1"=0.1}}]')


def test_end_to_end_writes_run_dir(tmp_path):
    cfg = load_config(None, [*TINY, "--poison.kind=patch_noise", PST, f"--log.run_dir={tmp_path}",
                             "--schedule.check_every=3"])
    s = train(cfg)
    for f in ("config.toml", "meta.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (tmp_path / f).is_file(), f
    assert list((tmp_path / "tb").glob("events.*"))
    keys = set().union(*(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()))
    for k in ("train/loss", "train/acc", "eval/val_acc", "eval/test_acc", "pst/stage", "pst/group_0/lr_mult",
              "detect/shortcut_gap", "detect/cluster/group_0"):
        assert k in keys, k
    assert s["stage_history"], "the always-true trigger should have fired"
    assert 0 <= s["final_test_acc"] <= 1 and s["peak_test_acc"] >= s["final_test_acc"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_resume_mid_stage_is_bit_identical(tmp_path):
    base = [*TINY, "--train.epochs=3", "--poison.kind=patch_noise", PST, "--train.optimizer=adamw",
            "--train.lr=0.01", "--data.augment=crop_flip"]
    full = train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'full'}"]))
    part_cfg = load_config(None, [*base, f"--log.run_dir={tmp_path / 'part'}", "--train.epochs=3"])
    # interrupt after epoch 2 (inside the schedule): train 2 epochs writing a checkpoint, then resume to 3
    train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'part'}", "--train.epochs=3",
                             "--train.checkpoint_every=1"]), stop_after_epochs=2)
    resumed = train(part_cfg, resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["stage_history"] == resumed["stage_history"] and full["test_curve"] == resumed["test_curve"]


def test_a_resume_at_a_stage_boundary_logs_the_stage_and_the_sample_grid_once(tmp_path):
    """The run entered its second stage at the step of its epoch-1 checkpoint, then lost what came after: the resume
    from that checkpoint enters the stage again at the same step, and metrics.jsonl and TensorBoard hold pst/stage
    at each step once, the sample grid once, as the uninterrupted run's do."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stages = '--schedule.stages=[{name="a",epochs=1},{name="b",freeze=[0]}]'
    args = [*TINY, "--data.synthetic_train=128", stages, "--train.checkpoint_every=1"]

    def save_epoch_1(epoch, *_):
        if epoch == 1:
            shutil.copy(tmp_path / "part" / "checkpoint.pt", tmp_path / "epoch1.pt")

    train(load_config(None, [*args, f"--log.run_dir={tmp_path / 'full'}"]))
    part = load_config(None, [*args, f"--log.run_dir={tmp_path / 'part'}"])
    train(part, on_epoch=save_epoch_1)
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "part" / "checkpoint.pt")  # as if epoch 2's had been lost
    train(part, resume=True)

    def stage_lines(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["pst/stage"]) for r in rows if "pst/stage" in r and "epoch" not in r]

    assert stage_lines("part") == stage_lines("full") == [(0, 0), (4, 1)]

    def tb(run):
        acc = EventAccumulator(str(tmp_path / run / "tb"), size_guidance={"images": 0})
        acc.Reload()
        return sorted((e.step, e.value) for e in acc.Scalars("pst/stage")), len(acc.Images("data/poisoned_samples"))

    assert tb("part") == tb("full") == ([(0, 0), (4, 0), (4, 1), (8, 1)], 1)  # entries and epoch ends, grid once


def test_a_resume_says_where_it_starts_and_what_changed_since_the_record(tmp_path, capsys):
    # a resume without the first run's --train.epochs=1 trained to the config's length and said nothing
    base = [*TINY, f"--log.run_dir={tmp_path}"]
    train(load_config(None, [*base, "--train.epochs=1"]))
    capsys.readouterr()
    train(load_config(None, [*base, "--train.epochs=1"]), resume=True)
    assert f"[resume] {tmp_path} from epoch 1, to train.epochs=1; as recorded" in capsys.readouterr().err
    train(load_config(None, [*base, "--train.epochs=2"]), resume=True)
    err = capsys.readouterr().err
    assert f"[resume] {tmp_path} from epoch 1, to train.epochs=2; changed since its record" in err, err
    assert "(meta.json keeps it): train.epochs: 1 -> 2" in err, err


def test_a_resume_on_other_kernels_says_so_and_meta_records_them(tmp_path, capsys):
    """meta.json records the vector instructions torch dispatched to; a resume with the same says nothing, one with
    others (the same machine told to use its plain C++ kernels: ATEN_CPU_CAPABILITY=default) trains on, says so on
    stderr, and its segment in meta.json's resumes records them."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default":
        pytest.skip("the caller's environment already forces torch's plain kernels")
    base = [*TINY, "--train.epochs=3", f"--log.run_dir={tmp_path}"]
    train(load_config(None, base), stop_after_epochs=1)
    train(load_config(None, base), resume=True, stop_after_epochs=2)
    assert "kernels differ" not in capsys.readouterr().err
    out = run_cli("train", *base, "--resume", env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernels differ" in out.stderr and "DEFAULT" in out.stderr, out.stderr[-2000:]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    ours = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}  # whatever the caller's environment sets
    assert [r["machine"]["env"] for r in meta["resumes"]] == [ours, {**ours, "ATEN_CPU_CAPABILITY": "default"}]
    assert meta["resumes"][-1]["machine"]["cpu_capability"] == "DEFAULT"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("first, crashed, noted", [
    ("here", "other", False),   # a resume on other kernels stopped before it saved: the checkpoint is from here
    ("other", "here", True),    # ... and the other way round: the checkpoint is from the other machine
    (None, None, False),        # a run from before meta.json recorded the machine
    ("broken", None, False),    # a hand-edited machine entry is passed over, not a crash
])
def test_the_resume_note_compares_with_the_segment_that_saved_the_checkpoint(tmp_path, capsys, first, crashed,
                                                                              noted):
    machines = {"here": machine_facts(), "other": {**machine_facts(), "cpu_capability": "OTHER"}, "broken": "x"}
    meta = {} if first is None else {"machine": machines[first]}
    if crashed is not None:  # resumed from epoch 2, stopped before epoch 3's checkpoint
        meta["resumes"] = [{"epoch": 2, "changes": {}, "machine": machines[crashed]}]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    write_run_header(tmp_path, load_config(None, TINY), resumed_at=2)
    assert ("kernels differ" in capsys.readouterr().err) == noted
    assert [r["epoch"] for r in json.loads((tmp_path / "meta.json").read_text())["resumes"]] == \
        ([2] if crashed is None else [2, 2])


def test_checkpoint_from_another_model(tmp_path):
    cfg = load_config(None, [*TINY, "--train.epochs=1", f"--log.run_dir={tmp_path}"])
    train(cfg)
    other = load_config(None, [*TINY, "--model.width=0.25"])
    from pst_dist.checkpoint import load_weights
    from pst_dist.evaluate import read_checkpoint
    from pst_dist.models import build_model
    from pst_dist.pst.freeze import trace_units
    from pst_dist.pst.groups import layer_groups

    m = build_model(other.model, 10, 3, 16)
    opt = build_optimizer(other, m, trace_units(m, layer_groups(m), torch.zeros(1, 3, 16, 16)))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "checkpoint.pt", m, opt, "resnet18")
    with pytest.raises(CheckpointError, match="model 'resnet18'"):
        load_checkpoint(tmp_path / "checkpoint.pt", m, opt, "vgg11_bn")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt", m, opt, "resnet18")
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for weights in (5, {"conv1.weight": "a string"}):  # was a TypeError / AttributeError traceback
        torch.save({**payload, "model": weights}, tmp_path / "odd.pt")
        with pytest.raises(CheckpointError, match="not a mapping|not a state dict of tensors"):
            load_checkpoint(tmp_path / "odd.pt", m, opt, "resnet18")
        with pytest.raises(CheckpointError, match="not a state dict of tensors"):  # eval's and export's way in
            load_weights(tmp_path / "odd.pt", m, read_checkpoint(tmp_path / "odd.pt")[0])


def test_bf16_autocast_and_vit(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, "--train.epochs=1", "--train.bf16=true", "--train.optimizer=adamw",
                             "--train.lr=0.001", "--model.name=vit_tiny_patch16_224", "--model.patch_size=4",
                             '--schedule.stages=[{name="a",steps=2},{name="b",freeze=[0,1],loss={view_ce=1.0}}]',
                             f"--log.run_dir={tmp_path}", "--log.tensorboard=false"])
    seen = set()  # the dtypes the ViT's linear layers computed in
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: seen.add((y := forward(self, x)).dtype) or y)
    s = train(cfg)
    assert s["steps"] == 8 and 0 <= s["final_test_acc"] <= 1
    assert torch.bfloat16 in seen, f"train.bf16=true but the linear layers computed in {seen}"


def test_lr_span_run_is_one_shape_across_stages_and_resumes_bit_identical(tmp_path):
    """train.lr_span = run: the lr of step 49 (in stage b, from step 32) is the run's cosine there (0.013), not a
    cosine restarted at stage b (0.045); a run stopped at the stage boundary and resumed ends with the same weights."""
    import math

    base = [*TINY, "--train.batch_size=8", "--train.lr_span=run",  # 32 steps per epoch, 64 in all
            '--schedule.stages=[{name="a",epochs=1},{name="b",freeze=[0]}]']

    def lrs(run_dir):  # logged every 50 steps: the lr of step 49
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["train/lr"] for r in rows if "train/lr" in r]

    train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'full'}"]))
    run = lrs(tmp_path / "full")
    assert run == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * 49 / 64))]), run
    part = [*base, f"--log.run_dir={tmp_path / 'part'}", "--train.checkpoint_every=1"]
    train(load_config(None, part), stop_after_epochs=1)
    train(load_config(None, part), resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lrs(tmp_path / "part") == run


def test_a_warm_up_that_stays_trains_on_unfired_and_hands_over_when_its_trigger_fires_later(tmp_path, capsys):
    """trigger.otherwise = "stay": stage a (1 epoch planned) never fires (train_acc > 1.5), so it trains on to the end
    with its lr restarted at epoch 2 (step 49: the cosine over steps 32-64, not stage b's), nothing frozen, and a run
    stopped at the planned end and resumed ends with the same weights; with a trigger that fires at its first consult
    (train_acc > 0, min_epochs 1.5) it fires at step 48 in that stretch and stage b runs from there; when stage b
    needs 24 steps (0.75 epoch), it may fire only until step 40, before min_epochs allows: never consulted, stage a
    stays to the end, and training says both."""
    import math

    def stages(threshold, min_epochs=0, b_epochs=0):
        return (f'--schedule.stages=[{{name="a",epochs=1,min_epochs={min_epochs},trigger={{kind="train_acc",'
                f'threshold={threshold},otherwise="stay"}}}},{{name="b",epochs={b_epochs},freeze=[0]}}]')

    base = [*TINY, "--train.batch_size=8", "--schedule.check_every=4"]  # 32 steps per epoch, 64 in all

    def rows(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    full = train(load_config(None, [*base, stages(1.5), f"--log.run_dir={tmp_path / 'full'}"]))
    assert "[pst] stage 0 ('a'): unfired at its planned end it stays; past that its trigger may fire until step 60 " \
           "(its last check) of 64 (epoch 1.88), then it stays to the end\n" in capsys.readouterr().err
    logs = rows(tmp_path / "full")
    assert full["stage_history"] == [] and {r["pst/stage"] for r in logs if "pst/stage" in r} == {0}
    assert [r["pst/group_0/lr_mult"] for r in logs if "epoch" in r] == [1.0, 1.0]  # never frozen
    assert [r["train/lr"] for r in logs if "train/lr" in r] == pytest.approx([0.1 * 0.5 * (1 + math.cos(
        math.pi * (49 - 32) / 32))])
    assert max(r["step"] for r in logs if "pst/trigger_value" in r) > 32  # still consulted past its planned end
    assert [(r["step"], r["pst/stayed"]) for r in logs if "pst/stayed" in r] == [(32, 0)]
    part = [*base, stages(1.5), f"--log.run_dir={tmp_path / 'part'}", "--train.checkpoint_every=1"]
    train(load_config(None, part), stop_after_epochs=1)
    train(load_config(None, part), resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert "loss/ce" in [r for r in logs if r["step"] == 50 and "train/lr" in r][0]
    # trigger.stay_ce = 0: past the planned length the raw cross-entropy is gone, the view's alone trains
    quiet = ('--schedule.stages=[{name="a",epochs=1,loss={view_ce=1},trigger={kind="train_acc",threshold=1.5,'
             'otherwise="stay",stay_ce=0}},{name="b",freeze=[0]}]')
    train(load_config(None, [*base, quiet, f"--log.run_dir={tmp_path / 'quiet'}"]))
    [row] = [r for r in rows(tmp_path / "quiet") if r["step"] == 50 and "train/lr" in r]
    assert "loss/ce" not in row and row["loss/view_ce"] > 0
    # from the first step past the planned length, not before: epoch 1 trains as with stay_ce = 1, epoch 2 not
    train(load_config(None, [*base, quiet.replace(",stay_ce=0", ""), f"--log.run_dir={tmp_path / 'loud'}"]))
    quiet_loss, loud_loss = ([r["train/loss"] for r in rows(tmp_path / d) if "epoch" in r] for d in ("quiet", "loud"))
    assert quiet_loss[0] == loud_loss[0] and quiet_loss[1] != loud_loss[1], (quiet_loss, loud_loss)
    part = [*base, quiet, f"--log.run_dir={tmp_path / 'quiet_part'}", "--train.checkpoint_every=1"]
    train(load_config(None, part), stop_after_epochs=1)  # stopped at the planned end, resumed into the stayed stretch
    train(load_config(None, part), resume=True)
    a = torch.load(tmp_path / "quiet" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "quiet_part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    late = train(load_config(None, [*base, stages(0.0, 1.5), f"--log.run_dir={tmp_path / 'late'}"]))
    assert late["stage_history"] == [[0, 48]]
    assert [(r["step"], r["pst/stage"]) for r in rows(tmp_path / "late") if "pst/stage" in r and "epoch" not in r] \
        == [(0, 0), (48, 1)]
    capsys.readouterr()
    cut = train(load_config(None, [*base, stages(0.0, 1.5, 0.75), f"--log.run_dir={tmp_path / 'cut'}"]))
    assert cut["stage_history"] == [] and not any("pst/trigger_value" in r for r in rows(tmp_path / "cut"))
    assert "[pst] stage 0 ('a'): its trigger is never consulted (the checks run every 4 steps; it may fire at one " \
           "after the stage's first step and min_epochs=1.5, before its planned end, or past it while the stages " \
           "after it still get their planned lengths)" in capsys.readouterr().err
    # the default checks, at each epoch's end: a 1-epoch stage that does not stay hands over at its only check
    plain = ('--schedule.stages=[{name="a",epochs=1,trigger={kind="train_acc",threshold=0.0}},'
             '{name="b",freeze=[0]}]')
    once = train(load_config(None, [*TINY, "--train.batch_size=8", plain, f"--log.run_dir={tmp_path / 'once'}"]))
    assert once["stage_history"] == [] and "[pst] stage 0 ('a'): its trigger is never consulted (the checks run at " \
        "each epoch's end, every 32 steps; it may fire at one after the stage's first step" in capsys.readouterr().err
    # a 2-epoch stage in a 1-epoch run: its only check is the run's last step; a longer stage would not help
    short = plain.replace("epochs=1", "epochs=2")
    train(load_config(None, [*TINY, "--train.batch_size=8", "--train.epochs=1", short,
                             f"--log.run_dir={tmp_path / 'short'}"]))
    assert "before its planned end, where it ends); as planned the stage lasts until the run's end (step 32), " \
           "where a fire lets nothing follow; lengthen the run (train.epochs) or check more often " \
           "(schedule.check_every) to let it fire" in capsys.readouterr().err
    # a resume at the stage's only check past its planned length (step 32; stage b needs the other 32): none left
    part = [*base, stages(1.5, 0, 1), f"--log.run_dir={tmp_path / 'last'}", "--train.checkpoint_every=1"]
    train(load_config(None, part), stop_after_epochs=1)
    assert "may fire until step 32 (its last check) of 64" in capsys.readouterr().err
    train(load_config(None, part), resume=True)
    assert "[pst] resuming at step 32: stage 0 ('a') has no check left where its trigger may fire (after " \
           "min_epochs=0.0, up to step 32, its fire deadline)" in capsys.readouterr().err


def _resumed_as_rounded_otherwise(cfg, key: str, capsys) -> tuple[dict, str, str]:
    """Train ``cfg`` one epoch, make meta.json's record of its repair ``key`` say other images (as if another machine
    had rounded the repair otherwise), resume it to the end: (the record as the run wrote it, the resume's stdout,
    its stderr)."""
    train(cfg, stop_after_epochs=1)
    path = Path(cfg.log.run_dir) / "meta.json"
    meta = json.loads(path.read_text())
    record = copy.deepcopy(meta["inputs"][key])
    meta["inputs"][key]["sha256"] = "0" * 64
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    train(cfg, resume=True)
    out, err = capsys.readouterr()
    return record, out, err


def test_a_spectral_check_over_its_threshold_ends_a_stage_that_would_stay_at_its_planned_length(tmp_path, capsys):
    """trigger.spectral_check: the data check runs before training and is logged at step 0; over the threshold
    (1e-9 times the noise: any shift) the unfired warm-up ends at its planned length (step 32) as with otherwise =
    "next", under it (1e9) the warm-up stays to the end with the very weights of a run without the check; a run
    stopped after epoch 1 and resumed takes the check's values from meta.json (logged once) and ends as the
    uninterrupted run; without a validation split of 2 classes the run is refused naming the key, before anything
    is written. trigger.spectral_repair: over the threshold the run trains on the repaired images (other weights,
    the same stages, recorded in meta.json; the resume above repairs them again and says so when they differ from
    the recorded ones), under it on the images as they are (the weights of a run without the check); without a
    check, refused."""
    from pst_dist.config import ConfigError

    def cfg(name, check, *more, repair=False):
        stages = (f'--schedule.stages=[{{name="a",epochs=1,trigger={{kind="train_acc",threshold=1.5,'
                  f'otherwise="stay",spectral_check={check},spectral_repair={str(repair).lower()}}}}},'
                  f'{{name="b",freeze=[0]}}]')
        return load_config(None, [*TINY, "--train.batch_size=8", "--schedule.check_every=4", stages, *more,
                                  f"--log.run_dir={tmp_path / name}"])

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    def weights(name):
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]

    for name, check in (("over", 1e-9), ("under", 1e9), ("off", 0)):
        train(cfg(name, check))
    capsys.readouterr()
    for name, check in (("over_repaired", 1e-9), ("under_repaired", 1e9)):
        train(cfg(name, check, repair=True))
        assert ("spectral repair" in capsys.readouterr().out) == (check < 1)
    over, under = rows("over"), rows("under")
    for logs, fired in ((over, 1.0), (under, 0.0)):
        first = next(r for r in logs if "detect/spectral_shift" in r)
        assert first["step"] == 0 and first["pst/spectral_check_fired"] == fired
        assert first["detect/spectral_shift"] > 0 and first["detect/spectral_noise"] > 0
    assert [(r["step"], r["pst/stage"]) for r in over if "pst/stage" in r and "epoch" not in r] == [(0, 0), (32, 1)]
    assert {r["pst/stage"] for r in under if "pst/stage" in r} == {0} and any("pst/stayed" in r for r in under)
    a, b = weights("under"), weights("off")
    assert all(torch.equal(a[k], b[k]) for k in a) and not any("detect/spectral_shift" in r for r in rows("off"))
    assert all(torch.equal(a[k], v) for k, v in weights("under_repaired").items())
    a, b = weights("over"), weights("over_repaired")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert [r["pst/stage"] for r in rows("over_repaired") if "pst/stage" in r and "epoch" not in r] == [0, 1]

    repaired = json.loads((tmp_path / "over_repaired" / "meta.json").read_text())["inputs"]["spectral_repair"]
    assert 0 < repaired["changed"] < 1 and len(repaired["sha256"]) == 64
    assert next(r for r in rows("over_repaired") if "detect/spectral_shift" in r)["pst/spectral_repair_changed"] \
        == repaired["changed"]
    part = cfg("part", 1e-9, "--train.checkpoint_every=1", repair=True)
    record, out, err = _resumed_as_rounded_otherwise(part, "spectral_repair", capsys)
    assert record == repaired  # the same images as the uninterrupted run's
    assert "spectral check (recorded at the run start)" in out and "spectral repair" in out
    assert "training images repaired by trigger.spectral_repair differ from those the run started with" in err
    assert "000000000000 then" in err
    assert len([r for r in rows("part") if "detect/spectral_shift" in r]) == 1
    a, b = weights("over_repaired"), weights("part")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match=r"schedule.stages\[0\].trigger.spectral_check=4.0: spectral_shift: 0 "
                                          r"classes .*\(the validation split has 1 image;"):
        train(cfg("refused", 4.0, "--data.val_size=1"))
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match=r"spectral_check=4.0 with data.val_size=0"):
        cfg("refused", 4.0, "--data.val_size=0")
    with pytest.raises(ConfigError, match=r"trigger.spectral_repair=True with trigger.spectral_check=0"):
        cfg("refused", 0, repair=True)


def test_a_mean_check_over_its_threshold_trains_on_the_repaired_images_and_a_resume_takes_its_record(tmp_path, capsys):
    """schedule.mean_repair on OPS: the check runs before training and is logged at step 0; over the threshold (1e-9
    times the noise) the run trains on the repaired images (other weights; meta.json records the check and the
    repair), under it (1e9) on the images as they are (the very weights of a run without the check); a run stopped
    after epoch 1 and resumed takes the check's values from meta.json, repairs again (saying so when the images
    differ from the recorded ones) and ends as the uninterrupted run, and one whose record says the check found
    nothing does not repair; a run whose spectral repair rewrote the images skips the check (the weights of a run
    without it), and a resume of one begun with both repairs is refused, its record kept; the bench's standard
    defense trains without
    it; without a validation split of 2 classes the run is refused naming the key, before anything is written."""
    from pst_dist.config import ConfigError
    from pst_dist.matrix import run_of

    def cfg(name, threshold, *more):
        return load_config(None, [*TINY, "--data.synthetic_train=512", "--data.val_size=200", "--poison.kind=ops",
                                  f"--schedule.mean_repair={threshold}", *more, f"--log.run_dir={tmp_path / name}"])

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    def weights(name):
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]

    for name, threshold in (("over", 1e-9), ("under", 1e9), ("off", 0)):
        train(cfg(name, threshold))
        assert ("mean repair:" in capsys.readouterr().out) == (threshold == 1e-9)
    for name, fired in (("over", 1.0), ("under", 0.0)):
        first = next(r for r in rows(name) if "detect/mean_shift" in r)
        assert first["step"] == 0 and first["pst/mean_repair_fired"] == fired
        assert first["detect/mean_shift"] > 0 and (first["pst/mean_repair_changed"] > 0) == bool(fired)
    a, b = weights("under"), weights("off")
    assert all(torch.equal(a[k], b[k]) for k in a) and not any("detect/mean_shift" in r for r in rows("off"))
    a = weights("over")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    recorded = json.loads((tmp_path / "over" / "meta.json").read_text())["inputs"]["mean_repair"]
    assert recorded["shift"] > 0 and 0 < recorded["changed"] < 0.01 and len(recorded["sha256"]) == 64
    unfired = json.loads((tmp_path / "under" / "meta.json").read_text())["inputs"]["mean_repair"]
    assert set(unfired) == {"shift", "noise"}

    part = cfg("part", 1e-9, "--train.checkpoint_every=1")
    record, out, err = _resumed_as_rounded_otherwise(part, "mean_repair", capsys)
    assert record == recorded
    assert "mean check (recorded at the run start)" in out and "mean repair:" in out
    assert "training images repaired by schedule.mean_repair differ from those the run started with" in err
    assert "000000000000 then" in err
    assert len([r for r in rows("part") if "detect/mean_shift" in r]) == 1
    b = weights("part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    part = cfg("zero", 1e-9, "--train.checkpoint_every=1")  # a record whose check found nothing: not repaired
    train(part, stop_after_epochs=1)
    meta = json.loads((tmp_path / "zero" / "meta.json").read_text())
    meta["inputs"]["mean_repair"] = {"shift": 0.0, "noise": meta["inputs"]["mean_repair"]["noise"]}
    (tmp_path / "zero" / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    train(part, resume=True)
    out = capsys.readouterr().out
    assert "shift 0.000 levels" in out and "no class-wise additive shortcut" in out and "mean repair:" not in out

    stages = ('--schedule.stages=[{name="a",epochs=1,trigger={kind="train_acc",threshold=1.5,otherwise="stay",'
              'spectral_check=1e-9,spectral_repair=true}},{name="b",freeze=[0]}]')
    for name, threshold in (("filtered", 1e-9), ("filtered_off", 0)):  # the spectral repair fires: no mean repair
        train(cfg(name, threshold, stages))
        assert ("mean check skipped: the spectral repair rewrote" in capsys.readouterr().out) == bool(threshold)
    a, b = weights("filtered"), weights("filtered_off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "mean_repair" not in json.loads((tmp_path / "filtered" / "meta.json").read_text())["inputs"]
    old = cfg("old", 1e-9, stages, "--train.checkpoint_every=1")  # begun by a version that applied both repairs
    train(old, stop_after_epochs=1)
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    meta["inputs"]["mean_repair"] = {"shift": 1.0, "noise": 0.1, "changed": 0.01, "sha256": "0" * 64}
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"the run started with schedule.mean_repair applied after the spectral "
                                          r"repair .* start the run again \(--overwrite\)"):
        train(old, resume=True)
    assert json.loads((tmp_path / "old" / "meta.json").read_text()) == meta

    assert "schedule.mean_repair=0" in run_of("standard")[1]
    with pytest.raises(ConfigError, match=r"schedule.mean_repair=4.0: mean_shift: 0 classes .*\(the validation "
                                          r"split has 1 image;"):
        train(cfg("refused", 4.0, "--data.val_size=1"))
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match=r"schedule.mean_repair=4.0 with data.val_size=0"):
        cfg("refused", 4.0, "--data.val_size=0")
    with pytest.raises(ConfigError, match=r"schedule.mean_repair=-1.0: must be >= 0"):
        cfg("refused", -1)


def test_a_trigger_fires_on_any_of_its_also_conditions_each_on_its_own_view(tmp_path):
    """trigger.also: the trigger's own condition cannot fire (train_acc > 1.5); its second also condition (a gap
    on the sharpen view, > -1.5: always) fires it at the first consult, and the run logs which condition fired and
    each condition's value and view's gap; the first (train_acc > 1.5) is consulted and stays quiet."""
    also = '[{kind="train_acc",threshold=1.5},{view="sharpen:2",threshold=-1.5}]'
    cfg = load_config(None, [*TINY, "--train.batch_size=8", "--schedule.check_every=4", f"--log.run_dir={tmp_path}",
                             f'--schedule.stages=[{{name="a",epochs=1,trigger={{kind="train_acc",threshold=1.5,'
                             f'view="blur",also={also}}}}},{{name="b",freeze=[0]}}]'])
    s = train(cfg)
    assert s["stage_history"] == [[0, 4]]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fired = next(r for r in rows if "pst/trigger_fired" in r)
    assert fired["step"] == 4 and fired["pst/trigger_fired_by"] == 2.0
    assert fired["pst/trigger_value/also_0"] == fired["pst/trigger_value"] == fired["detect/probe_acc"]
    assert fired["pst/trigger_value/also_1"] == fired["detect/shortcut_gap/also_1"] == pytest.approx(
        fired["detect/probe_acc"] - fired["detect/probe_view_acc/also_1"])
    assert "detect/shortcut_gap" in fired  # the trigger's own view (blur), as before
    assert "detect/shortcut_gap/also_0" not in fired  # a train_acc condition measures no view


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_batch_blends_images_and_labels_by_the_same_share_from_its_seed(kind, monkeypatch):
    """loss.mix: each image with its neighbour in the batch; the label weights are the images' shares (cutmix: the
    box's pixels), the same for the same seed, and the global random state is left as it was (the GPUs' too: no
    reseeding of them at all)."""
    from pst_dist.pst.losses import mix_batch

    def reseed_gpus(*_):
        raise AssertionError("mix_batch reseeded the GPUs' generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseed_gpus)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseed_gpus)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    state = torch.get_rng_state()
    mixed, target = mix_batch(x, y, kind, 1.0, 10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again, same = mix_batch(x, y, kind, 1.0, 10, seed=7)
    assert torch.equal(mixed, again) and torch.equal(target, same)
    assert not torch.equal(mix_batch(x, y, kind, 1.0, 10, seed=8)[0], mixed)
    own = target[torch.arange(8), y]  # image i's own label weight; its neighbour is image i - 1
    assert torch.allclose(own + target[torch.arange(8), y.roll(1)], torch.ones(8))
    if kind == "cutmix":  # the neighbour's share is the share of pixels taken from it
        taken = (mixed != x).any(1).float().mean((1, 2))
        assert torch.allclose(1 - own, taken, atol=1e-6), (own, taken)
    else:
        assert torch.allclose(mixed, own[:, None, None, None] * x + (1 - own[:, None, None, None]) * x.roll(1, 0))


def test_a_stage_that_mixes_trains_on_mixed_batches_and_resumes_bit_identical(tmp_path):
    """loss.mix = cutmix in the last stage: the run differs from one without from that stage on, not before, and
    stopped and resumed inside it gives the same weights (the draws come from the step's seed); bad values are
    refused, naming them."""
    def stages(mix):
        return (f'--schedule.stages=[{{name="a",epochs=1}},{{name="b",freeze=[0],loss={{ce=1.0,view_ce=0.5,'
                f'mix="{mix}"}}}}]')

    base = [*TINY, "--train.epochs=3", "--train.batch_size=16"]
    plain = train(load_config(None, [*base, stages("none"), f"--log.run_dir={tmp_path / 'plain'}"]))
    full = train(load_config(None, [*base, stages("cutmix"), f"--log.run_dir={tmp_path / 'full'}"]))
    losses = [[json.loads(r)["train/loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "epoch" in json.loads(r)] for d in ("plain", "full")]
    assert losses[0][0] == losses[1][0] and losses[0][1] != losses[1][1], losses
    part = [*base, stages("cutmix"), f"--log.run_dir={tmp_path / 'part'}", "--train.checkpoint_every=1"]
    train(load_config(None, part), stop_after_epochs=2)
    resumed = train(load_config(None, part), resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and full["test_curve"] == resumed["test_curve"]
    assert plain["test_curve"] != full["test_curve"]
    from pst_dist.config import ConfigError

    for bad, named in ((stages("blend"), "loss.mix='blend'"),
                       ('--schedule.stages=[{name="a",loss={mix="mixup",mix_alpha=0}}]', "loss.mix_alpha=0"),
                       ('--schedule.stages=[{name="a",loss={mix="mixup",cluster_penalty=0.1}}]', "cluster_penalty"),
                       ('--schedule.stages=[{name="a",loss={mix="cutmix"}}]', "defense.kind='ueraser'")):
        extra = ["--defense.kind=ueraser", "--defense.ueraser_repeats=1"] if "ueraser" in named else []
        with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
            load_config(None, [*base, bad, *extra])


def test_all_finite_finds_one_non_finite_value_in_any_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model.register_parameter("empty", torch.nn.Parameter(torch.empty(0)))  # skipped: nothing to check
    assert all_finite(model)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for p in (model[0].bias, model[1].weight):
            with torch.no_grad():
                old = p.view(-1)[1].item()
                p.view(-1)[1] = bad
            assert not all_finite(model), (bad, p.shape)
            with torch.no_grad():
                p.view(-1)[1] = old
        assert all_finite(model)


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def test_an_in_process_deepspeed_run_leaves_no_process_group_or_launcher_variables(tmp_path, monkeypatch):
    """A bench or a search trains many runs in one process: the one-process group a DeepSpeed run makes, and the
    launcher variables it sets for DeepSpeed, are gone after the run, and after a run refused once the group is up."""
    import torch.distributed as dist

    from pst_dist.rundir import RunDirError

    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)  # monkeypatch puts back the test's own environment, whatever happens
    ds = [*TINY, "--train.epochs=1", "--deepspeed.enabled=true", "--train.device=cpu"]
    summary = train(load_config(None, [*ds, f"--log.run_dir={tmp_path / 'run'}"]))
    assert summary["status"] == "finished"
    assert not dist.is_initialized() and not [k for k in LAUNCHER_VARS if k in os.environ]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("{}")  # a user's own file: refused in check_run_dir, after the group is made
    with pytest.raises(RunDirError, match="summary.json"):
        train(load_config(None, [*ds, f"--log.run_dir={mine}"]))
    assert not dist.is_initialized() and not [k for k in LAUNCHER_VARS if k in os.environ]
    assert (mine / "summary.json").read_text() == "{}"

    def refused(**_kw):
        raise RuntimeError("no group today")  # as a port taken between choosing and binding it

    from pst_dist.distributed import init_distributed

    monkeypatch.setattr(dist, "init_process_group", refused)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a value there before (the group would set "0"): put back as it was
    with pytest.raises(RuntimeError, match="no group today"):
        init_distributed("cpu", single_process_group=True)
    assert [k for k in LAUNCHER_VARS if k in os.environ] == ["LOCAL_RANK"] and os.environ["LOCAL_RANK"] == "1"


def test_training_says_which_stages_do_not_run_and_that_a_last_stage_s_trigger_is_never_consulted(tmp_path, capsys):
    stages = ('--schedule.stages=[{name="a",epochs=1},{name="b",epochs=1},'
              '{name="c",trigger={kind="train_acc",threshold=0.5}}]')
    train(load_config(None, [*TINY, "--data.synthetic_train=64", "--train.epochs=1", f"--log.run_dir={tmp_path}",
                             stages, "--deepspeed.grad_clip=1.0"]))
    err = capsys.readouterr().err
    assert "deepspeed.enabled=false: deepspeed.grad_clip=1.0 do nothing in this run" in err  # inert, said so
    assert "[pst] stage 2 ('c'), the last, runs to the run's end: its trigger is never consulted" in err
    for i, name in ((1, "b"), (2, "c")):
        assert f"[pst] stage {i} ({name!r}) starts as planned at step " in err, err
    assert err.count("train.epochs=1): it does not run; lengthen the run or shorten the stages before it") == 2


def test_a_view_the_images_cannot_take_is_refused_naming_its_key_before_anything_is_written(tmp_path):
    """A 6-pixel blur needs a 37-pixel kernel: on 16-pixel images it failed mid-training with a padding traceback."""
    from pst_dist.config import ConfigError

    run_dir = tmp_path / "r"
    for stages, key in (('[{name="a",loss={ce=1.0,view_ce=1.0,view="blur:6"}}]', r"schedule.stages\[0\].loss.view"),
                        ('[{name="a",epochs=1,trigger={kind="shortcut_gap",view="blur:6"}},{name="b"}]',
                         r"schedule.stages\[0\].trigger.view")):
        with pytest.raises(ConfigError, match=key + r"='blur:6' \(strength 1\) cannot be applied to these \dx16x16"):
            train(load_config(None, [*TINY, "--data.synthetic_train=64", f"--log.run_dir={run_dir}",
                                     f"--schedule.stages={stages}"]))
        assert not run_dir.exists()


def frozen_bn_stats_moved(run_dir, *extra) -> tuple[list[str], int]:
    """Train one epoch with groups 0 and 1 frozen from the start; (the BatchNorm statistics of theirs that left
    their initial 0 / 1, how many there are)."""
    from pst_dist.models import build_model
    from pst_dist.pst.groups import layer_groups

    cfg = load_config(None, [*TINY, "--train.epochs=1", f"--log.run_dir={run_dir}", "--log.tensorboard=false",
                             '--schedule.stages=[{name="frozen", freeze=[0, 1]}]', *extra])
    train(cfg)
    model = build_model(cfg.model, 10, 3, 16)
    frozen = {n.rsplit(".", 1)[0] for g in layer_groups(model)[:2] for n in g.param_names}
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    stats = {n: t for n, t in state.items() if n.rsplit(".", 1)[0] in frozen and "running_" in n}
    assert stats, "expected BatchNorm statistics in groups 0 and 1"
    initial = {n: torch.zeros_like(t) if "mean" in n else torch.ones_like(t) for n, t in stats.items()}
    return [n for n, t in stats.items() if not torch.equal(t, initial[n])], len(stats)


def test_a_detector_check_inside_a_frozen_stage_leaves_the_frozen_groups_batchnorm_statistics(tmp_path):
    # the probe put the whole model back in train mode: the frozen groups' BatchNorm statistics moved on the rest of
    # the epoch's batches after the first check (PST.md: frozen groups' statistics fixed)
    moved, _ = frozen_bn_stats_moved(tmp_path, "--schedule.check_every=2")
    assert not moved, f"frozen BatchNorm statistics moved: {moved[:4]}"


def test_schedule_freeze_bn_stats_false_lets_the_frozen_groups_statistics_move(tmp_path):
    # the setting itself, through train(): off, frozen groups' BatchNorm normalises with batch statistics and
    # updates its running ones (the weights stay frozen either way); on (the default), they stay
    moved, n = frozen_bn_stats_moved(tmp_path / "off", "--schedule.freeze_bn_stats=false")
    assert len(moved) == n, f"with freeze_bn_stats=false only {len(moved)} of {n} statistics moved"
    assert frozen_bn_stats_moved(tmp_path / "on", "--schedule.freeze_bn_stats=true")[0] == []
