"""What a new machine sees: the suite owns its Ray state (an empty HOME, no ~/.ray/auth_token, a token of its own)
and stops only the Ray it started; `.ci/run` runs `make test` with a fresh empty HOME; nothing in pst_dist/ or
tune/ needs more than the Python the README and pyproject promise."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_tune import BIN, OwnRay, _alive

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "pst_dist").rglob("*.py"), *(ROOT / "tune").rglob("*.py")])


# ---------------------------------------------------------------------------------------------------------------
# Ray: an empty HOME is enough, and a cluster someone else started survives the tests' teardown


@pytest.mark.multiproc
def test_ray_head_starts_with_an_empty_home_and_its_teardown_spares_a_users_cluster(tmp_path):
    # the user's cluster, started as README.md says: a token made by `ray get-auth-token --generate` in the user's
    # ~/.ray/auth_token, RAY_AUTH_MODE=token for the head and for every client
    user = OwnRay(tmp_path / "user-home")
    user_env = {k: v for k, v in user.env().items() if k != "RAY_AUTH_TOKEN"}
    ours = OwnRay(tmp_path / "home")  # what the own_ray fixture of tests/test_tune.py builds
    try:
        gen = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=user_env, capture_output=True,
                             text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr[-2000:]
        assert (user.home / ".ray" / "auth_token").read_text() == gen.stdout.strip()
        user_dashboard, _ = user.start_head(env=user_env)
        users = user.processes()
        assert any("raylet" in " ".join(p.cmdline()) for p in users)

        ours.start_head()  # as the tests' clusters start their head: HOME empty, no ~/.ray/auth_token anywhere
        assert not list(ours.home.iterdir()), "ray start read or wrote state under the test's HOME"
        mine = ours.processes()
        assert mine and not {p.pid for p in mine} & {p.pid for p in users}

        left = ours.close()  # the fixtures' teardown
        assert not left, left
        assert not any(_alive(p) for p in mine)
        assert not ours.temp.exists()
        gone = [p.pid for p in users if not _alive(p)]
        assert not gone, f"the teardown stopped processes of a cluster it did not start: {gone}"
        jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", user_dashboard], env=user_env,
                              capture_output=True, text=True, timeout=120)
        assert jobs.returncode == 0, (jobs.stdout + jobs.stderr)[-2000:]  # still serving, token from ~/.ray
    finally:
        left = ours.close() + user.close()
    assert not left, left


# ---------------------------------------------------------------------------------------------------------------
# .ci/run: `make test` with a fresh empty HOME


def test_ci_runs_make_test_with_a_fresh_empty_home_and_removes_it(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "make").write_text('#!/bin/sh\n{ echo "$HOME"; echo "$*"; ls -A "$HOME"; } > "$RECORD"\n'
                               'touch "$HOME/left-by-the-run"\nexit "${FAKE_EXIT:-0}"\n')
    (fake / "make").chmod(0o755)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a leftover of an earlier run\n")
    record = tmp_path / "record"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(home), "RECORD": str(record)}
    env.pop("PY", None)
    for code in (0, 3):
        run = subprocess.run([str(ROOT / ".ci" / "run")], env={**env, "FAKE_EXIT": str(code)}, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == code, run.stderr[-2000:]  # make's failure is CI's failure
        ci_home, args, *listing = record.read_text().splitlines()
        assert Path(ci_home) != home and not listing, (ci_home, listing)  # a new, empty HOME
        assert args.split()[0] == "test" and "PY=" in args
        assert not Path(ci_home).exists()  # removed afterwards
    assert (home / ".ray" / "auth_token").is_file()  # the real HOME untouched


def _fake_tools(tmp_path: Path, scripts: dict[str, str]) -> dict:
    """An environment whose PATH finds these shell scripts first (each records its arguments in $RECORD)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (fake / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "$RECORD"\n{body}\n')
        (fake / name).chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "RECORD": str(tmp_path / "record")}


@pytest.mark.parametrize("in_process", [False, True])
def test_a_test_session_ended_by_sigterm_runs_its_teardowns(tmp_path, in_process):
    """A CI job's time limit or `kill` ends pytest with SIGTERM: the session stops as after Ctrl-C (exit 2, no later
    test runs) and a fixture's teardown runs (the tests' own Ray clusters are stopped by theirs), instead of Python
    dying at once; also while a test runs a command in-process (whose own handler turns SIGTERM into exit 143). The
    session leaves nothing in the machine's temp dir (TMPDIR), not even the cache folder torch makes there when a test
    module imports timm at collection."""
    import signal
    import textwrap
    import time

    started, torn, after, run = (tmp_path / name for name in ("started", "torn_down", "after", "run"))
    (tmp_path / "test_waits.py").write_text(textwrap.dedent(f"""
        import pathlib, time, pytest
        import pst_dist.train  # as the test modules do: timm, and torch's cache folder in the temp dir

        @pytest.fixture
        def owned():
            yield
            pathlib.Path({str(torn)!r}).write_text("torn down")

        def test_waits(owned):
            pathlib.Path({str(started)!r}).write_text("")
            if {in_process!r}:
                from tests.conftest import TINY, run_cli_in_process
                run_cli_in_process("train", *TINY, "--train.epochs=500", "--log.run_dir={run}")
            time.sleep(120)

        def test_after():
            pathlib.Path({str(after)!r}).write_text("")
    """))
    machine_tmp = tmp_path / "tmp"  # the session's TMPDIR, as /tmp is a CI machine's; no cache folder named for it
    machine_tmp.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}, "TMPDIR": str(machine_tmp)}
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                          f"--basetemp={tmp_path / 'base'}", str(tmp_path / "test_waits.py")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        mark = run / "metrics.jsonl" if in_process else started  # in-process: once the command trains
        while not mark.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert mark.exists(), p.communicate(timeout=30)[0][-3000:] if p.poll() is not None else "never started"
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert torn.read_text() == "torn down", out[-3000:]
    assert p.returncode == 2 and "KeyboardInterrupt" in out and not after.exists(), (p.returncode, out[-3000:])
    assert not list(machine_tmp.iterdir()), list(machine_tmp.iterdir())


def test_system_deps_installs_the_required_packages_and_an_unavailable_optional_one_does_not_stop_it(tmp_path):
    # one apt-get install of all of them: a system without dataset-fashion-mnist got none of FFCV's build needs
    env = _fake_tools(tmp_path, {"dpkg": "exit 1", "id": "echo 0",
                                 "apt-get": 'case "$*" in *dataset-fashion-mnist*) exit 100;; esac; exit 0'})
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "system-deps"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "record").read_text().splitlines()
    required = next(c for c in calls if c.startswith("apt-get install") and "libturbojpeg0-dev" in c)
    assert all(p in required for p in ("build-essential", "python3-dev", "python3-venv", "libopencv-dev"))
    assert "dataset-fashion-mnist" not in required
    assert "dataset-fashion-mnist not installed (optional" in r.stdout, r.stdout
    env = _fake_tools(tmp_path, {"apt-get": 'case "$*" in *libopencv-dev*) exit 100;; esac; exit 0'})
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "system-deps"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, "a required package that did not install must stop the install"


def test_make_install_recreates_a_venv_left_without_pip(tmp_path):
    # a `python -m venv` that failed for want of ensurepip leaves .venv/bin/python: the next make skipped the venv
    # and died on "No module named pip"
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    broken = tmp_path / ".venv" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    broken.write_text("#!/bin/sh\nexit 1\n")  # no pip
    broken.chmod(0o755)
    make_venv = ('[ "$1" = -m ] && [ "$2" = venv ] || exit 1\nmkdir -p "$3/bin"\n'
                 'printf \'#!/bin/sh\\necho "venv-python $*" >> "$RECORD"\\n\' > "$3/bin/python"\n'
                 'chmod +x "$3/bin/python"')
    env = _fake_tools(tmp_path, {"dpkg": "exit 0", "python3": make_venv})
    r = subprocess.run(["make", "-s", "-C", str(tmp_path), "install", "PY=python3"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "record").read_text().splitlines()
    assert "python3 -m venv .venv" in calls, calls
    assert any(c.startswith("venv-python -m pip install") and "torch==" in c for c in calls), calls
    assert (tmp_path / ".venv" / ".installed").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Python 3.10: what pyproject's requires-python and the README promise

# names Python 3.11+ added, by module
NEWER = {
    "tomllib": None,  # the whole module (3.11): needs the tomli fallback
    "datetime": {"UTC"},
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "Required",
               "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform", "override", "TypeAliasType"},
    "enum": {"StrEnum", "verify", "EnumCheck", "ReprEnum", "global_enum", "member", "nonmember"},
    "asyncio": {"TaskGroup", "timeout", "Runner"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "operator": {"call"},
    "itertools": {"batched"},
}
BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _fallback_guarded(tree: ast.AST, node: ast.AST) -> bool:
    """Whether an ``import tomllib`` sits in a ``try`` whose ImportError handler imports tomli."""
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(node is n for s in t.body for n in ast.walk(s)):
            for h in t.handlers:
                names = {e.id for e in ast.walk(h.type) if isinstance(e, ast.Name)} if h.type else set()
                tomli = any(isinstance(n, (ast.Import, ast.ImportFrom)) and "tomli" in ast.dump(n)
                            for s in h.body for n in ast.walk(s))
                if names & {"ImportError", "ModuleNotFoundError"} and tomli:
                    return True
    return False


def newer_python_uses(path: Path) -> list[str]:
    """Uses of Python 3.11+ syntax or names in one source file, as ``file:line: what``."""
    src = path.read_text(encoding="utf-8")
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    try:
        ast.parse(src, str(path), feature_version=(3, 10))  # 3.11+ syntax such as except*
    except SyntaxError as e:
        return [f"{where}:{e.lineno}: {e.msg}"]
    tree = ast.parse(src, str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "tomllib" and not _fallback_guarded(tree, node):
                    found.append(f"{where}:{node.lineno}: import tomllib without the tomli fallback")
        elif isinstance(node, ast.ImportFrom) and node.module in NEWER and node.level == 0:
            names = NEWER[node.module]
            for a in node.names:
                if names is None and not _fallback_guarded(tree, node):
                    found.append(f"{where}:{node.lineno}: from {node.module} import without the tomli fallback")
                elif names is not None and a.name in names:
                    found.append(f"{where}:{node.lineno}: {node.module}.{a.name} (Python 3.11+)")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if NEWER.get(node.value.id) and node.attr in NEWER[node.value.id]:
                found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} (Python 3.11+)")
        elif isinstance(node, ast.Name) and node.id in BUILTINS:
            found.append(f"{where}:{node.lineno}: {node.id} (Python 3.11+)")
    return found


def test_nothing_in_pst_dist_or_tune_needs_python_3_11():
    assert len(SOURCES) > 10
    found = [f for p in SOURCES for f in newer_python_uses(p)]
    assert not found, "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    cases = {"import tomllib\n": "without the tomli fallback",
             "try:\n    import tomllib\nexcept ImportError:\n    pass\n": "without the tomli fallback",
             "from datetime import UTC\n": "datetime.UTC",
             "import datetime\nx = datetime.UTC\n": "datetime.UTC",
             "from typing import Self\n": "typing.Self",
             "import enum\nclass A(enum.StrEnum):\n    pass\n": "enum.StrEnum",
             "raise ExceptionGroup('x', [])\n": "ExceptionGroup",
             "try:\n    pass\nexcept* ValueError:\n    pass\n": "3.11"}
    for i, (src, what) in enumerate(cases.items()):
        path = tmp_path / f"m{i}.py"
        path.write_text(src)
        found = newer_python_uses(path)
        assert found and what in found[0], (src, found)
    ok = tmp_path / "ok.py"
    ok.write_text("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n")
    assert newer_python_uses(ok) == []


def _python310() -> str | None:
    candidates = [shutil.which("python3.10"),
                  *sorted(Path(os.environ.get("PYENV_ROOT", "/nonexistent")).glob("versions/3.10*/bin/python3.10"))]
    for c in filter(None, candidates):
        try:
            out = subprocess.run([str(c), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return str(c)
    return None


def test_every_module_compiles_under_python_3_10():
    py = _python310()
    if py is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    code = """
import sys
bad = []
for f in sys.argv[1:]:
    try:
        compile(open(f, encoding="utf-8").read(), f, "exec", dont_inherit=True)
    except SyntaxError as e:
        bad.append(f"{f}:{e.lineno}: {e.msg}")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""
    run = subprocess.run([py, "-c", code, *map(str, SOURCES)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_readme_states_the_python_pyproject_requires():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r">=\s*3\.\d+", requires), requires
    minimum = requires.lstrip(">= ")
    stated = re.findall(r"Python (3\.\d+)\+", (ROOT / "README.md").read_text())
    assert stated and set(stated) == {minimum}, (stated, requires)
    assert sys.version_info[:2] >= tuple(map(int, minimum.split(".")))
