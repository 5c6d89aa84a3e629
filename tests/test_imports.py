"""The package's import graph: no cycles (module-level and function-level imports both count), and function-local
imports only where a one-line comment says why (an optional heavy dependency, or start-up time)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pst_dist", "tune")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """The project modules an ``import`` / ``from ... import`` names (a name imported from a package may be a
    submodule: both are returned when they exist)."""
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    return [target, *(f"{target}.{a.name}" for a in node.names)]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """({module: project modules it imports}, [(module, line, source line) of each function-local import])."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    local: list[tuple[str, int, str]] = []
    for mod, path in files.items():
        src = path.read_text()
        tree = ast.parse(src)
        lines = src.splitlines()
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                        for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = _resolve(mod, path.name == "__init__.py", node)
            else:
                continue
            targets = {n for n in names if n in files and n != mod}
            graph[mod] |= targets
            if id(node) in in_functions and not _in_type_checking(tree, node):
                local.append((mod, node.lineno, lines[node.lineno - 1].strip()))
    return graph, local


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            if any(node is c for c in ast.walk(n)):
                return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 20
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_local_imports_say_why():
    """A function-local import is allowed for an optional heavy dependency (deepspeed, ffcv, ray and what needs
    them), or for start-up time, and then carries a comment on its line or the line above saying so."""
    _, local = import_graph()
    files = {_module_name(p): p.read_text().splitlines() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    unexplained = []
    for mod, line, text in local:
        src = files[mod]
        here, above = src[line - 1], src[line - 2] if line > 1 else ""
        said = here.split("#", 1)[1].strip() if "#" in here else ""
        if re.fullmatch(r"noqa(:\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*)?", said):  # a bare lint pragma is not a reason
            said = ""
        if not said and not above.strip().startswith("#"):
            unexplained.append(f"{mod}:{line}: {text}")
    assert not unexplained, "function-local imports without a reason:\n" + "\n".join(unexplained)


def test_the_cli_module_imports_no_torch():
    """`pst-dist` catches a user's error classes and Ctrl-C from main(); torch (seconds to import) loads inside the
    command, so Ctrl-C in the first second is the one-line interruption, not a traceback from an import (and `keys`
    and `show-config` start without it)."""
    import subprocess
    import sys

    code = "import sys, pst_dist.cli; sys.exit(int('torch' in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"importing pst_dist.cli imports torch {r.stderr[-2000:]}"


@pytest.mark.parametrize("text,reason", [
    ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it "
     "can result in arbitrary code execution.Do it only if you get the file from a trusted source. WeightsUnpickler "
     "error: Unsupported class posix.system", "Unsupported class posix.system"),  # torch 2.3: one line
    ("Weights only load failed. This file can still be loaded, to do so you have two options, \\x1b[1mdo those steps "
     "only if you trust the source of the checkpoint\\x1b[0m. \n\t(1) In PyTorch 2.6, we changed the default value of "
     "the `weights_only` argument in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` "
     "set to `False` will likely succeed, but it can result in arbitrary code execution. Do it only if you got the "
     "file from a trusted source.\n\t(2) Alternatively, to load with `weights_only=True` please check the recommended "
     "steps in the following error message.\n\tWeightsUnpickler error: Unsupported global: GLOBAL posix.system was "
     "not an allowed global by default. Please use `torch.serialization.add_safe_globals([system])` to allowlist.",
     "Unsupported global: GLOBAL posix.system was not an allowed global by default"),  # torch 2.5 / 2.6
    ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
     "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
     "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source."
     "\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation "
     "of torch.load to learn more about types accepted by default with weights_only https://pytorch.org/docs/stable/"
     "generated/torch.load.html.", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"),
])
def test_a_weights_only_refusal_is_its_reason_in_every_torch_wording(text, reason):
    """torch's weights-only refusal as pst-dist reports it: the reason, found by content (its place in the text moved
    between torch 2.3, 2.5 / 2.6 and later), never the advice to load with weights_only=False."""
    import pickle

    from pst_dist.io import load_failure

    said = load_failure(pickle.UnpicklingError(text))
    assert said == f"a weights-only load refuses it: {reason}" and "False" not in said, said
