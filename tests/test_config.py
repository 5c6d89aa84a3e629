import subprocess
import sys

import pytest
import tomllib

from pst_dist.config import Config, ConfigError, dump_toml, from_dict, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["--train.lr=0.05", "--model.name=vgg11_bn", "--poison.kind=patch_noise"])
    assert cfg.train.lr == 0.05 and cfg.model.name == "vgg11_bn" and cfg.poison.kind == "patch_noise"


def test_toml_roundtrip(tmp_path):
    cfg = load_config(None, ['--schedule.stages=[{name="a",epochs=1,freeze=[0],trigger={kind="cluster",group=1}},'
                             '{name="b",group_mults={"2"=0.1},loss={view_ce=1.0}}]'])
    again = from_dict(Config, tomllib.loads(dump_toml(cfg)))
    assert again == cfg
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("override,needle", [
    (["--train.lrr=0.1"], "train.lrr"),
    (["--train.threads=-1"], "train.threads=-1"),  # was torch's RuntimeError at the run's start
    (["--data.seed=123456789012345678901234567890"], "data.seed=123456789012345678901234567890"),  # an overflow
    (["--train.seed=-3"], "a seed must be in"),
    (["--poison.seed=140737488355328"], "poison.seed=140737488355328"),  # 2**47: seed * 100_003 overflows
    (["--tune.seed=-1"], "tune.seed=-1"),
    (["--nosuch.key=1"], "nosuch"),
    (["--train.lr=fast"], "train.lr"),
    (["--train.epochs=1.5"], "train.epochs"),
    (["--poison.eps=0"], "poison.eps"),
    # each was accepted: a crash after an epoch (probe_size=0), timm's traceback (drop_rate), or a negative recorded
    # that trained as 1 / 0 (checkpoint_every, warmup_steps)
    (["--data.probe_size=0"], r"data.probe_size=0: must be >= 1"),
    # tracebacks or silent misparses before (helper-60)
    (["--poison.eps=1" + "0" * 400], r"poison.eps=1000.*: expected a finite number"),
    (["--train.epochs=5#0"], r"TOML reads only part of the value '5#0'"),
    (["--train.epochs=99999999999999999999"], r"train.epochs=99999999999999999999: out of range"),  # not TOML's
    (['--tune.attacks=["em"]#,"rem"]'], r"TOML reads only part of the value"),
    (["--schedule.stages.0.loss.view_ce=1"], r"schedule.stages is not a list in the config file, so its item 0"),
    (['--schedule.eval_views=["blur:inf"]'], r"strength inf must be a finite number > 0"),
    (['--schedule.stages=[{name="a",group_mults={"03"=0.5}}]'], r"group_mults key '03' is not a group index"),
    (['--schedule.stages=[{name="a",group_mults={"\u00b2"=0.5}}]'], r"group_mults key '\u00b2' is not a group"),
    (["--data.root=/d/caf\udce9"], r"data.root='/d/caf\\udce9': holds bytes that are not UTF-8"),
    (["--model.drop_rate=1.5"], r"model.drop_rate=1.5: must lie in \[0, 1\)"),
    (["--train.checkpoint_every=-1"], r"train.checkpoint_every=-1: must be >= 0"),
    (["--train.warmup_steps=-5"], r"train.warmup_steps=-5: must be >= 0"),
    (["--poison.eps=1.5"], "poison.eps"),
    (["--schedule.stages=[]"], "empty"),
    (['--schedule.stages=[{name="a",bogus=1}]'], "bogus"),
    (["--data.source=mnist"], "data.source"),
    (["--data.synthetic_train=-2000"], r"data.synthetic_train=-2000: must be >= 1"),
    (['--schedule.eval_views=["randblur:1"]'], r"eval_views\[0\]='randblur:1': 'randblur' is random"),
    (['--schedule.eval_views=["blur:1", "smudge"]'], r"eval_views\[1\]='smudge': unknown view 'smudge'"),
    (['--schedule.stages=[{name="a",epochs=1,min_epochs=-1}]'], r"stage 'a': min_epochs=-1.0 must be >= 0"),
    (['--schedule.stages=[{name="a",epochs=1,steps=3}]'], r"stage 'a': epochs=1.0 and steps=3: give one length"),
    (['--schedule.stages=[{name="a",epochs=1,min_epochs=0.5}]'], r"stage 'a': min_epochs=0.5 without a trigger"),
    (['--schedule.stages=[{name="a",freeze=[0,1],group_mults={"1"=0.5}}]'],
     r"stage 'a': group 1 is in freeze=\[0, 1\] and in group_mults \(\{'1' = 0.5\}\)"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, override)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_cli_bad_key_exits_nonzero(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pst_dist.cli", "train", "--train.lrr=0.1",
                          f"--log.run_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "train.lrr" in out.stderr
    assert not (tmp_path / "run").exists()


def test_recipes_load():
    from pathlib import Path

    for p in sorted(Path(__file__).parent.parent.glob("launch/configs/*.toml")):
        load_config(p)


def test_every_recipe_resolves_to_a_pst_schedule():
    """Each recipe in launch/configs trains PST: more than one stage, and some stage freezes or rescales a layer group
    (the CIFAR recipe once said PST but had no [schedule], which resolves to one plain standard stage)."""
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.glob("launch/configs/*.toml"))
    assert any(p.name == "cifar10_resnet18_patch.toml" for p in recipes)
    for p in recipes:
        if p.name == "tune_fmnist.toml":
            continue  # its stages are the template the search fills in (tune/space.py), tested in test_tune.py
        stages = load_config(p).schedule.stages
        assert len(stages) >= 2, f"{p.name}: {len(stages)} stage(s)"
        assert any(s.freeze or s.group_mults for s in stages), f"{p.name}: no stage freezes or rescales a group"


def test_retired_key_loads_at_its_old_value_and_is_refused_otherwise(tmp_path):
    """train.num_workers never reached a DataLoader: a recorded config (or a tune-written recipe) holding its old
    value 0 still loads, without it; any other value is refused, naming the key and the one that does the work."""
    p = tmp_path / "recorded.toml"
    p.write_text(dump_toml(load_config(None, ["--train.lr=0.05"])).replace("[train]\n", "[train]\nnum_workers = 0\n"))
    assert "num_workers = 0" in p.read_text()
    assert load_config(p) == load_config(None, ["--train.lr=0.05"])
    for bad in ("2", "false"):
        with pytest.raises(ConfigError, match=r"train\.num_workers=.*retired.*data\.loader_workers"):
            load_config(None, [f"--train.num_workers={bad}"])
    assert "num_workers" not in dump_toml(load_config(p))
    p.write_text(p.read_text().replace("num_workers = 0", "num_workers = 4"))  # a run recorded what did nothing
    with pytest.raises(ConfigError, match=r"train\.num_workers=4: this key is retired"):
        load_config(p)
    assert load_config(p, recorded=True) == load_config(None, ["--train.lr=0.05"])


def test_a_recorded_config_with_stage_settings_that_did_nothing_still_loads_as_it_trained(tmp_path):
    """Refused in a config since stop 51, inert before: a run recorded with them resumes, evaluates and exports."""
    f = tmp_path / "config.toml"
    f.write_text('[[schedule.stages]]\nname = "a"\nepochs = 1.0\nsteps = 3\nmin_epochs = 0.5\nfreeze = [0, 1]\n'
                 'group_mults = { "1" = 0.5, "2" = 0.1 }\n\n[[schedule.stages]]\nname = "b"\n')
    with pytest.raises(ConfigError, match="stage 'a': epochs=1.0 and steps=3"):
        load_config(f)
    a = load_config(f, recorded=True).schedule.stages[0]
    assert (a.epochs, a.steps, a.min_epochs, a.freeze, a.group_mults) == (1.0, 0, 0.0, [0, 1], {"2": 0.1})
    assert a.mults(4) == [0.0, 0.0, 0.1, 1.0]  # what the run trained with: freeze won over group_mults


def test_a_recorded_negative_checkpoint_every_or_warmup_loads_as_it_trained(tmp_path):
    # refused since, they trained as every |n| epochs and no warm-up: a run recorded with them still resumes / evals
    f = tmp_path / "config.toml"
    f.write_text(dump_toml(load_config(None)).replace("checkpoint_every = 1", "checkpoint_every = -2")
                 .replace("warmup_steps = 0", "warmup_steps = -5"))
    with pytest.raises(ConfigError, match="train.checkpoint_every=-2"):
        load_config(f)
    t = load_config(f, recorded=True).train
    assert (t.checkpoint_every, t.warmup_steps) == (2, 0)


@pytest.mark.parametrize("override,needle", [
    ("--schedule.stages.0.freeze.x=1", r"'x' indexes a list: expected 0, 1"),
    ("--schedule.stages.-1.name=z", r"'-1' indexes a list"),
    ("--schedule.stages.0=x", r"schedule.stages\[0\]: expected a table, got str 'x'"),
    ("--schedule.stages.2.name=z", r"index 2 out of range \(have 2\)"),
])
def test_an_override_into_a_list_names_a_bad_index(tmp_path, override, needle):
    # TypeError / AttributeError / ValueError tracebacks before
    f = tmp_path / "two.toml"
    f.write_text('[[schedule.stages]]\nname = "a"\nfreeze = [0]\nepochs = 1\n\n[[schedule.stages]]\nname = "b"\n')
    with pytest.raises(ConfigError, match=needle):
        load_config(f, [override])
    assert load_config(f, ["--schedule.stages.0.freeze.0=1"]).schedule.stages[0].freeze == [1]


def test_a_config_path_of_an_unknown_user_s_home_is_named():
    with pytest.raises(ConfigError, match="--config='~nosuchuser_pst/x.toml': no such user's home directory"):
        load_config("~nosuchuser_pst/x.toml")


def test_a_string_key_given_a_number_says_how_to_quote_it():
    """A run directory named by a year (log.run_dir=2024) reads as an integer: the error shows the quoting that
    works, and that quoting gives the string."""
    with pytest.raises(ConfigError, match=r"log\.run_dir: expected a string, got int 2024 .*quote it, e\.g\. "
                                          r"--log\.run_dir='\"2024\"'"):
        load_config(None, ["--log.run_dir=2024"])
    assert load_config(None, ['--log.run_dir="2024"']).log.run_dir == "2024"
    with pytest.raises(ConfigError, match=r"got date .*quote it, e\.g\. --log\.run_dir='\"2024-05-01\"'"):
        load_config(None, ["--log.run_dir=2024-05-01"])  # a dated run directory: TOML reads a date
