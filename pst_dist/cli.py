"""``pst-dist`` command line: train, demo, tune, poison, bench, diagnose, eval, export, keys, show-config, report,
compare, write-beton."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from .config import (
    Config,
    ConfigError,
    absolute_paths,
    class_doc,
    config_keys,
    dump_toml,
    load_config,
    shown_default,
)
from .io import CheckpointError, DataError, OutputError, PoisonFileError, check_parent_dir, exit_cleanups, write_atomic
from .registry import ATTACKS


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: torchrun ending the other ranks after one failed, a scheduler's preemption,
    ``kill``. The run's own cleanup runs (trackers marked failed, temporary files and folders removed)."""


_HANDLERS: list = []
"""The SIGTERM handler :func:`sigterm_as_interrupt` has set, while a command runs."""


def _default_sigterm_in_child() -> None:
    """A process forked while a command runs (a decoding or FFCV writer process) gets SIGTERM's default back at
    once: its parent's terminate() must end it, and a child forked after a thread has run may not run a Python
    handler in time."""
    if _HANDLERS and signal.getsignal(signal.SIGTERM) is _HANDLERS[-1]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(ValueError):  # nor write its signals into the parent's watch (_ends_when_stuck)
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs (main thread only): SIGTERM raises :class:`Terminated` where the command is. One that
    arrives while an error is being handled is sent again half a second later, until it lands outside such a block,
    so the cleanup of that error is not cut short and the signal is not lost; once raised, later ones are ignored
    (the sender's SIGKILL still ends the process). A child process forked meanwhile (a decoding or writer process)
    dies of it as before. Without this Python dies at once and leaves its tracker runs RUNNING and its temporary
    files behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner, state = os.getpid(), {"fired": False, "done": False}

    def again() -> None:
        if not state["done"]:
            os.kill(owner, signal.SIGTERM)

    def handler(signum, frame) -> None:  # never in a forked child: _default_sigterm_in_child took it away there
        if state["fired"]:
            return
        if sys.exc_info()[0] is not None:  # handling an error: not now, but not never
            timer = threading.Timer(0.5, again)
            timer.daemon = True
            timer.start()
            return
        state["fired"] = True
        raise Terminated()

    before = signal.signal(signal.SIGTERM, handler)
    _HANDLERS.append(handler)
    try:
        with _ends_when_stuck(TERM_GRACE_S, taken=lambda: state["fired"]):
            yield
    finally:
        state["done"] = True
        _HANDLERS.remove(handler)
        signal.signal(signal.SIGTERM, before)


TERM_GRACE_S = 20.0
"""Seconds a command has, after a SIGTERM, to end by its own cleanup before :func:`_ends_when_stuck` ends it (a
scheduler's SIGKILL follows its SIGTERM after 30 s by default: Slurm's KillWait, Kubernetes' grace period)."""


@contextlib.contextmanager
def _ends_when_stuck(grace: float, taken: Callable[[], bool]) -> Iterator[None]:
    """A SIGTERM whose Python handler cannot run, because the main thread is blocked inside a call that never
    returns to the interpreter (a collective waiting for a rank that is frozen or cut off: gloo's default timeout is
    30 minutes), still ends the process: a thread woken by the signal itself (:func:`signal.set_wakeup_fd`) exits
    with 143, saying why, when the handler has not run ``grace`` seconds later (``taken``: whether it has; then the
    command's cleanup, a tracker's upload say, runs to its end). What is published stays complete (every file is
    written to a temporary, then renamed); a resume removes the temporaries."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    ended = threading.Event()

    def watch() -> None:
        try:
            while got := os.read(r, 512):
                if signal.SIGTERM in got:
                    if not ended.wait(grace) and not taken():
                        sys.stderr.write(f"pst-dist: terminated (SIGTERM), and {grace:g} s later still inside a call "
                                         f"that does not return (a collective waiting for another rank, or a long "
                                         f"write); exiting now. Published files are complete; a training run keeps "
                                         f"its last checkpoint (continue it with --resume)\n")
                        sys.stderr.flush()
                        os._exit(143)
                    return
        finally:
            os.close(r)

    before = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="pst-dist-sigterm-watch", daemon=True).start()
    try:
        yield
    finally:
        ended.set()
        signal.set_wakeup_fd(before)
        os.close(w)  # the watching thread's read ends


OWN_SIGNALS = ("bench", "tune")
"""Commands that leave SIGTERM as it is: Ray's driver installs its own handler (``ray.init``), and the bench's pool
would wait for its running cells (hours) before the command could end."""
PRINTING = ("keys", "show-config", "report", "compare")
"""Commands whose work is printing: a reader closing stdout (`pst-dist keys | head`) ends them quietly."""


def _split_overrides(rest: list[str], resumes: bool = False) -> list[str]:
    """``rest`` when each is an override; ``resumes``: the command has --resume=auto (hinted at for `--resume auto`)."""
    bad = [r for r in rest if not r.startswith("--") or "=" not in r]
    if bad:
        hint = " (resume-or-start is --resume=auto, one word)" if resumes and bad[0] == "auto" else ""
        raise ConfigError(f"unexpected argument {bad[0]!r}: overrides look like --section.key=value{hint}")
    return rest


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import train  # start-up time: each command imports only what it runs

    cfg = load_config(args.config, _split_overrides(rest, resumes=True))
    absolute_paths(cfg)  # the recorded config names the files it trained on, whatever directory reads it later
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_curve")}, indent=2))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the process group is gone: skip the interpreter's teardown, which now and then aborts with "terminate
        # called without an active exception" after multi-process DeepSpeed runs, but not what Python's exit removes
        # (wandb's temporary folders)
        sys.stdout.flush()
        sys.stderr.flush()
        exit_cleanups()
        os._exit(0)
    return 0


def cmd_write_beton(args: argparse.Namespace, rest: list[str]) -> int:
    from .data.pipeline import write_betons  # start-up time: each command imports only what it runs

    cfg = load_config(args.config, _split_overrides(rest))
    meta = write_betons(cfg, Path(args.out), overwrite=args.overwrite, write_mode=args.mode,
                        jpeg_quality=args.jpeg_quality, num_workers=args.workers,
                        log=lambda m: print(m, file=sys.stderr))
    n = meta["poison"]["norms"]
    print(f"{args.out}: {meta['write_mode']} {meta['source']} {meta['shape']}, "
          + ", ".join(f"{k} {v['num_samples']}" for k, v in meta["splits"].items())
          + f"; poison {meta['poison']['kind']} Linf {n['linf'] * 255:.0f}/255 L2 {n['l2_mean']:.3f}"
          + f"; {meta['seconds']} s")
    return 0


USER_ERRORS = (ConfigError, DataError, CheckpointError, PoisonFileError, OutputError)
"""A user's mistake (a bad config or value, bad data, an output in the way): one line and exit 2, not a traceback."""


def os_error_text(e: OSError) -> str:
    """An OSError in one line, naming its file: a full disk, a path that cannot be read or written."""
    return f"{f'{e.filename}: ' if e.filename else ''}{e.strerror or e} ({type(e).__name__})"


def run_script(name: str, main: Callable[[], int | None]) -> int:
    """A ``launch/`` script's ``main()`` under the command line's handling of a user's mistake (a bad config or
    value, a missing or unreadable file, an output in the way): one line ``NAME: error: ...`` naming it and exit 2
    (1 for another OS error: a full disk), not a traceback. Returns the exit status."""
    try:
        return main() or 0
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: error: {os_error_text(e)}", file=sys.stderr)
        return 2 if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) else 1


def cmd_tune(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from tune.search import run_search  # start-up time: each command imports only what it runs
    except ImportError as e:
        raise ConfigError(f"pst-dist tune needs Ray Tune and the repository's tune/ package ({e}); "
                          f"install with `make`") from None

    cfg = load_config(args.config, _split_overrides(rest, resumes=True))
    summary = run_search(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    if summary["unfinished"]:  # stopped (Ctrl-C): not a search's result; a shell or scheduler sees the interrupt
        return 130
    return 0 if not summary["errors"] and summary["best"] is not None else 1


def cmd_poison(args: argparse.Namespace, rest: list[str]) -> int:
    from .data.pipeline import write_poisoned  # start-up time: each command imports only what it runs

    cfg = load_config(args.config, _split_overrides(rest))
    if args.import_file:  # a poison made elsewhere, checked against the clean data and stored as ours
        cfg.poison = replace(cfg.poison, kind="file", path=args.import_file)
    meta = write_poisoned(cfg, Path(args.out), overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    n = meta["norms"]
    what = f"imported {args.import_file}" if args.import_file else meta["attack"]
    print(f"{args.out}: {what} on {meta['source']} {meta['shape']}; Linf {n['linf'] * 255:.0f}/255, "
          f"L2 mean {n['l2_mean']:.3f} max {n['l2_max']:.3f}, L0 mean {n['l0_mean']:.1f}; {meta['seconds']} s. "
          f"Train on it: --poison.kind=file --poison.path={args.out}"
          + (f" --poison.ratio={cfg.poison.ratio:g}" if cfg.poison.ratio < 1 else ""))
    if cfg.poison.ratio < 1:  # a store holds every image poisoned; the ratio is chosen when a run reads it
        print(f"[poison] poison.ratio={cfg.poison.ratio:g}: stored every image poisoned; a run reading the store "
              f"poisons that fraction when given --poison.ratio={cfg.poison.ratio:g}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .matrix import run_bench  # start-up time: each command imports only what it runs

    if args.config is None:
        raise ConfigError("pst-dist bench needs --config (e.g. launch/configs/bench_fmnist.toml)")
    if not Path(args.config).is_file():
        raise ConfigError(f"config file not found: {args.config}")
    summary = run_bench(args.config, _split_overrides(rest))
    return 0 if not summary["errors"] else 1


def cmd_diagnose(args: argparse.Namespace, rest: list[str]) -> int:
    from .diagnose import run_diagnose  # start-up time: each command imports only what it runs

    over = _split_overrides(rest)
    given = {o.split("=", 1)[0] for o in over}
    if "--log.run_dir" in given:
        raise ConfigError("diagnose: --log.run_dir given, but it trains into --out/run; leave it out")
    if args.standard and "--schedule.stages" in given:
        raise ConfigError("diagnose: --schedule.stages given, but --standard names the schedule; leave it out")
    if args.standard:
        over = ['--schedule.stages=[{name="standard"}]', *over]
    cfg = load_config(args.config, over)
    if cfg.poison.kind == "none":
        print("pst-dist diagnose: poison.kind='none': poisoned and clean probes are the same images", file=sys.stderr)
    run_diagnose(cfg, Path(args.out), probe_size=args.probe_size, overwrite=args.overwrite)
    print(f"wrote {Path(args.out) / 'diagnose.png'}, {Path(args.out) / 'diagnose.jsonl'}; TensorBoard: "
          f"tensorboard --logdir {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from .evaluate import evaluate_run  # start-up time: each command imports only what it runs

    out = Path(args.out) if args.out else None

    def check_out(meanwhile: bool = False) -> bool:  # before the work, and before the write: replaced only if ours
        if not (out.exists() or out.is_symlink()):
            return True
        if args.overwrite and _is_eval_output(out):
            return False
        if meanwhile and not args.overwrite:
            raise OutputError(f"--out {out}: appeared while evaluating; left as it is")
        raise OutputError(f"--out {out}: exists" + (" and is not an earlier `pst-dist eval` output; choose another "
                          "--out" if args.overwrite else "; pass --overwrite to replace an earlier eval output"))

    if out is not None:
        check_out()
        check_parent_dir(out, "--out")
    result = evaluate_run(Path(args.run), args.checkpoint, _split_overrides(rest), args.split)
    text = json.dumps(result, indent=2)
    if out is not None:
        write_atomic(out, text + "\n", new=check_out(meanwhile=True))  # a file put there meanwhile is not replaced
    print(text)
    return 0


def _is_eval_output(f: Path) -> bool:
    try:
        return {"run", "checkpoint", "split", "accuracy"} <= set(json.loads(f.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return False


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from .export import export_run  # start-up time: each command imports only what it runs

    if rest:
        raise ConfigError(f"pst-dist export: unexpected argument {rest[0]!r} (the model is the run's)")
    spec = export_run(Path(args.run), Path(args.out), args.checkpoint, overwrite=args.overwrite)
    load = f"timm.create_model('local-dir:{args.out}', pretrained=True) or " if spec["pst_dist"]["plain_timm"] else ""
    print(f"{args.out}: model.safetensors + config.json ({spec['architecture']}, {spec['num_classes']} classes, "
          f"input {'x'.join(map(str, spec['pretrained_cfg']['input_size']))}, epoch {spec['pst_dist']['epoch']}); "
          f"load with {load}pst_dist.models.load_exported('{args.out}')")
    return 0


def cmd_keys(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise ConfigError(f"pst-dist keys: unexpected argument {rest[0]!r} (one SECTION or key at most)")
    want = args.section
    keys = [k for k in config_keys() if not want or k.key == want or k.key.startswith((f"{want}.", f"{want}[]."))]
    if not keys:
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"keys: no config section or key {args.section!r} (sections: {sections})")
    section = None
    for k in keys:
        if k.key.split(".")[0] != section:
            section = k.key.split(".")[0]
            doc = class_doc(type(getattr(Config(), section)))
            print(f"[{section}]" + "".join(f"\n  {line}" for line in doc.splitlines()) + "\n")
        print(f"{k.key}: {k.type} = {shown_default(k.default)}")
        text = k.doc
        if k.key == "poison.kind":  # its docstring sends here for the attacks: each with its registry doc
            text += "".join(f"\n  {name}: {e.doc}" for name, e in ATTACKS.items())
        print("".join(f"    {line}\n" for line in text.splitlines()))
    return 0


def cmd_show_config(args: argparse.Namespace, rest: list[str]) -> int:
    print(dump_toml(load_config(args.config, _split_overrides(rest))))
    return 0


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from .demo import run_demo  # start-up time: each command imports only what it runs

    run_demo(args.config, _split_overrides(rest), Path(args.out), seeds=args.seeds)
    return 0


def cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    """Aggregate summary.json files of runs named <label>_seed<k> into a mean +- std table."""
    from .io import read_json  # start-up time: each command imports only what it runs
    from .report import check_plot_path, format_table, plot_curves, summary_problem  # start-up: what it runs

    if rest:
        raise ConfigError(f"pst-dist report: unexpected argument {rest[0]!r} (one runs directory; --plot FILE)")
    if args.plot:
        check_plot_path(Path(args.plot))  # before anything is printed
    groups: dict[str, list[dict]] = {}
    failed: list[str] = []
    for path in sorted(Path(args.runs).glob("*/summary.json")):
        label = path.parent.name.rsplit("_seed", 1)[0]
        summary = read_json(path, "a run summary", DataError)
        if summary.get("status", "finished") != "finished":
            failed.append(f"{path.parent.name}: FAILED: {summary.get('error', summary.get('status'))}")
            continue
        if problem := summary_problem(summary, curve=bool(args.plot)):
            raise DataError(f"{path}: {problem}")
        groups.setdefault(label, []).append(summary)
    if not groups and not failed:
        runs = Path(args.runs)
        if not runs.is_dir():
            raise DataError(f"{args.runs}: no such directory (give the directory that holds the run directories)")
        if (runs / "summary.json").is_file():
            raise DataError(f"{args.runs} is itself a run (it holds summary.json): give the directory that holds it "
                            f"({runs.resolve().parent}), or read its summary.json")
        raise DataError(f"no */summary.json under {args.runs}")
    if groups:
        print(format_table(groups))
    for line in failed:  # never averaged in: a diverged run has no accuracy to report
        print(line)
    if args.plot and groups:
        plot_curves(groups, Path(args.plot), recheck=True)
    return 0


def cmd_compare(args: argparse.Namespace, rest: list[str]) -> int:
    """Two bench outputs, paired by (attack, seed); the worst-case validation rule with a margin."""
    from .compare import compare, format_comparison  # start-up time: each command imports only what it runs

    if rest:
        raise ConfigError(f"unexpected argument {rest[0]!r}")
    attacks = [x.strip() for x in args.attacks.split(",") if x.strip()] if args.attacks is not None else None
    if attacks == []:
        raise ConfigError(f"--attacks {args.attacks!r}: names no attack (a comma-separated list, e.g. em,lsp)")
    print(format_comparison(compare(args.a, args.b, args.defense, args.margin, attacks, args.rule)))
    return 0


def _run_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """eval's and export's --run and --checkpoint."""
    p.add_argument("--run", required=True, help="the run directory (its config.toml, meta.json and checkpoint)")
    p.add_argument("--checkpoint", help="the run's checkpoint.pt, ds_checkpoint folder or one of its "
                   "step<N> tags (default: the run's latest)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pst-dist", description="Progressive Staged Training against unlearnable "
                                     "examples. Config overrides: --section.key=value")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train one configuration", epilog="Any config key can be overridden as "
                       "--section.key=value; `pst-dist keys [SECTION]` lists every key with its type, default and "
                       "description")
    p.add_argument("--config", help="TOML recipe, e.g. launch/configs/fmnist_pst.toml")
    p.add_argument("--resume", action="store_true", help="continue the run in log.run_dir from its last checkpoint "
                   "(the config must be the recorded one but for more train.epochs, thread / loader / checkpoint "
                   "settings and [log] [tune] [bench]: RESUME_MAY_CHANGE in pst_dist/config.py; data.root and "
                   "poison.path may name a copy of the run's .beton files or poison, checked against its record)")
    p.add_argument("--resume=auto", dest="resume", action="store_const", const="auto", help="continue the run "
                   "when log.run_dir holds one, start it when not (one command for a job that may be preempted and "
                   "launched again)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in log.run_dir (its run files only)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("demo", help="poison, then train clean / poisoned / PST and print the table")
    p.add_argument("--config", default=None, help="base recipe (default: launch/configs/demo.toml settings)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--seeds", type=int, default=1, help="seeds per condition")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("write-beton", help="write the (poisoned) data set as FFCV .beton files (lossless)")
    p.add_argument("--config", help="TOML recipe: its [data] and [poison] sections are written")
    p.add_argument("--out", required=True, help="output directory (train/val/test.beton + beton.json)")
    p.add_argument("--mode", choices=("raw", "jpg"), default="raw",
                   help="raw (default, exact pixels) or jpg (lossy: itself a JPEG defense, warns)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for --mode jpg")
    p.add_argument("--workers", type=int, default=2, help="writer processes")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier write-beton output in --out")
    p.set_defaults(fn=cmd_write_beton)
    p = sub.add_parser("tune", help="Ray Tune search over PST schedules ([tune] section); local Ray unless "
                       "RAY_ADDRESS names a cluster")
    p.add_argument("--config", help="TOML recipe with a [tune] section, e.g. launch/configs/tune_fmnist.toml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in tune.out/tune.name")
    p.add_argument("--resume=auto", dest="resume", action="store_const", const="auto", help="continue the search "
                   "when there is one, begin it when not (one entrypoint for a job that is launched again)")
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("poison", help="generate [poison] on the whole training split and store it losslessly")
    p.add_argument("--config", help="TOML recipe: its [data] and [poison] sections")
    p.add_argument("--out", required=True, help="output directory (train_images.npy + poison.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `pst-dist poison` output in --out")
    p.add_argument("--import", dest="import_file", metavar="FILE", help="instead of generating, import a poison "
                   "made elsewhere (poison.kind=file's formats: an Unlearnable-Examples perturbation.pt, an APBench "
                   "export, a folder of images, ...), checked against the clean data and budget poison.eps")
    p.set_defaults(fn=cmd_poison)
    p = sub.add_parser("bench", help="attack x defense matrix over seeds ([bench] section): CSV, markdown table, "
                       "heatmap; resumes, skipping finished cells")
    p.add_argument("--config", help="TOML recipe with a [bench] section, e.g. launch/configs/bench_fmnist.toml")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("diagnose", help="train, and after each epoch measure per-group linear-probe accuracy and "
                       "activation clustering on poisoned vs clean training images; plot them")
    p.add_argument("--config", help="TOML recipe (its [poison] is the one diagnosed)")
    p.add_argument("--out", default="runs/diagnose", help="output directory (diagnose.png, diagnose.jsonl, run/)")
    p.add_argument("--standard", action="store_true", help="train one standard stage instead of the recipe's schedule")
    p.add_argument("--probe-size", type=int, default=2000, help="training images probed (half fit, half score)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier diagnose output in --out")
    p.set_defaults(fn=cmd_diagnose)
    p = sub.add_parser("eval", help="accuracy of a run's checkpoint on its test (or val) split, or on other data "
                       "(--data.source=... --data.root=...), with the run's test-time views (schedule.eval_views, "
                       "which --schedule.eval_views=[...] may change); prints JSON, writes nothing into the run")
    _run_checkpoint_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="the split evaluated")
    p.add_argument("--out", help="also write the result to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier eval output in --out")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="a run's weights as model.safetensors + timm config.json in a folder "
                       "(ZeRO partitions gathered); load with timm or pst_dist.models.load_exported")
    _run_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output folder (model.safetensors, config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("keys", help="every config key with its type, default and description")
    p.add_argument("section", nargs="?", help="only this section (data, poison, ..., schedule.stages) or key")
    p.set_defaults(fn=cmd_keys)
    p = sub.add_parser("show-config", help="print the resolved config as TOML")
    p.add_argument("--config")
    p.set_defaults(fn=cmd_show_config)
    p = sub.add_parser("report", help="mean +- std table over runs/<label>_seed<k>/summary.json")
    p.add_argument("runs")
    p.add_argument("--plot", help="also write a PNG of the test-accuracy curves here")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare", help="two bench outputs side by side, paired by (attack, seed): does recipe B beat "
                       "recipe A on the worst case over attacks by --margin points of validation accuracy? (test "
                       "printed, report only)")
    p.add_argument("a", help="the incumbent: a `pst-dist bench` output directory (or its results.csv)")
    p.add_argument("b", help="the challenger: another bench output directory (or its results.csv)")
    p.add_argument("--defense", default="pst", help="the defense compared (default pst)")
    p.add_argument("--margin", type=float, default=0.5, help="points of validation accuracy B must gain to be adopted, "
                   "on the worst case (or, leximin, at the deciding rank) (default 0.5, about one seed's spread over "
                   "three)")
    p.add_argument("--attacks", help="only these attacks, comma-separated (e.g. the cells where the recipes differ)")
    p.add_argument("--rule", default="worst", help="worst: the worst case over attacks alone (default); leximin: "
                   "each side's attacks sorted from its worst, the first rank that differs by the margin decides")
    p.set_defaults(fn=cmd_compare)
    for command in (parser, *sub.choices.values()):  # `--resum` was taken for --resume: a typo is named instead
        command.allow_abbrev = False
    args, rest = parser.parse_known_args(argv)
    try:
        with contextlib.nullcontext() if args.cmd in OWN_SIGNALS else sigterm_as_interrupt():
            return args.fn(args, rest)
    except USER_ERRORS as e:
        print(f"pst-dist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        print(f"pst-dist: {how}; {args.cmd} stopped. Files are complete or absent; a training run keeps its last "
              f"checkpoint (continue it with --resume)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:  # a full disk, a path that cannot be written: one line, not a traceback
        if isinstance(e, BrokenPipeError) and args.cmd in PRINTING:  # stdout closed by its reader (`keys | head`):
            with contextlib.suppress(OSError):  # quiet, as any pipe's writer; the exit's flush writes nowhere
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE
        print(f"pst-dist: error: {os_error_text(e)}; nothing half-written was left", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - user-facing failures of training itself
        from .train import TrainingDiverged  # start-up time: each command imports only what it runs

        if isinstance(e, TrainingDiverged):
            print(f"pst-dist: error: {e}", file=sys.stderr)
            return 3
        if (lost := peer_lost(e)) is not None:
            print(f"pst-dist: error: rank {os.environ.get('RANK', '0')}: another rank of the run is gone ({lost}); "
                  f"the run keeps its last checkpoint: --resume it with every rank", file=sys.stderr)
            return 1
        raise


def cluster_main(command: str, script: str, argv: list[str], last: tuple[str, ...] = ()) -> int:
    """``pst-dist <command> <argv> <last>`` on the running Ray cluster, for an entry point that ``ray submit`` or
    ``ray job submit`` runs (``script``: tune/run.py, launch/bench_ray.py): with RAY_ADDRESS unset (``ray submit``),
    the cluster ``ray start`` started on this node is joined, said in one line; exit 2 where none runs
    (:func:`pst_dist.distributed.join_cluster_here`)."""
    if "-h" not in argv and "--help" not in argv:
        from .distributed import join_cluster_here  # start-up time: torch, only for these entry points

        try:
            if joined := join_cluster_here(script, command):
                print(joined, file=sys.stderr)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return main([command, *argv, *last])


def peer_lost(e: BaseException) -> str | None:
    """The one line that says so when ``e`` is a collective's failure because another rank went away (killed, its
    node lost: gloo's "Connection reset by peer" or closed socket, NCCL's remote errors) in a run of several ranks;
    else None (any other error's traceback stays whole)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    if not re.search(r"connection (reset|closed|refused) by peer|connection refused|broken pipe|ncclRemoteError|"
                     r"remote process exited|socket timeout|transport/tcp/pair\.cc.*(read|write) error", text, re.I):
        return None  # a collective's other failures (out of memory, wrong devices, bad input) are bugs: traceback
    text = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")  # gloo's source-file prefix
    return text.split(". ")[0].rstrip(".") or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())


