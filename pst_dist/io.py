"""Small shared file helpers: atomic writes, content hashes, and the rules for output locations.

Every command writes through these, so that what pst-dist writes is complete or absent, and nothing pst-dist did
not write is ever deleted or overwritten:

- :func:`write_atomic` / :func:`save_atomic`: a file goes to a hidden temporary name beside its target and is
  renamed into place; on any failure (full disk, Ctrl-C) the temporary file is removed.
- :func:`check_out_dir` + :func:`atomic_dir`: a directory output (``pst-dist poison --out``, ``write-beton --out``)
  is built in a hidden sibling and renamed into place. An existing ``--out`` is accepted only when it is empty, or
  when it holds an earlier output of the same command and ``--overwrite`` was given; anything else in it is refused
  by name, never removed.
- :func:`reported`: cleanup after an error (closing files and trackers, leaving a process group) whose own failure
  is reported on stderr, so that the first error is the one raised.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


class OutputError(ValueError):
    """An output location cannot be used as asked; the message names it and what is in the way."""


class DataError(ValueError):
    """A data set is missing or malformed; the message names the file. (Defined here, torch-free, so that the CLI
    can catch it before importing torch; :mod:`pst_dist.data.sources` re-exports it.)"""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the run (re-exported by :mod:`pst_dist.checkpoint`)."""


class PoisonFileError(ValueError):
    """An imported poison does not fit the data set; the message names the expected and found values (re-exported by
    :mod:`pst_dist.poison`)."""


@contextlib.contextmanager
def reported(what: str, errors: list[BaseException] | None = None) -> Iterator[None]:
    """Run the block; an exception it raises is printed on stderr (``[pst] <what> failed: ...``), not raised. With
    ``errors``, it is also appended there (a Ctrl-C too: the caller decides what to raise once the rest is done);
    without, a Ctrl-C goes on up."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - reported here; the caller has an error of its own to raise
        if errors is None and not isinstance(e, Exception):
            raise
        print(f"[pst] {what} failed: {type(e).__name__}: {e}", file=sys.stderr)
        if errors is not None:
            errors.append(e)


def exit_cleanups() -> None:
    """Run what the interpreter's exit runs for ``weakref.finalize`` objects, for a process about to end with
    ``os._exit``: a ``tempfile.TemporaryDirectory`` is removed by one (wandb makes two when it is imported), and
    would otherwise stay in the temp dir. Call it once the process's output is flushed; nothing it meets (an error,
    a signal) is raised: the process is ending."""
    run = getattr(weakref.finalize, "_exitfunc", None)  # the hook weakref registers with atexit (CPython)
    try:
        if run is not None:
            run()
    except BaseException as e:  # noqa: BLE001 - a clean-up at the exit: said, never raised
        print(f"[pst] removing temporary folders before the exit failed: {type(e).__name__}: {e}", file=sys.stderr)


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 4 MiB blocks: about 1 s per GB on one core)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _machine() -> str:
    """This machine as a temporary name says it: ``<host>+<pid namespace>``, so a name left by a killed write can
    be told from one still being written on another machine (a shared file system) or in another container of the
    same host name (its own process ids)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', socket.gethostname()) or 'host'}+{ns}"


def _writer() -> str:
    """This process as a temporary name says it: ``<machine>-<pid>`` (:func:`_machine`)."""
    return f"{_machine()}-{os.getpid()}"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_writer()}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): running
        return True
    return True


def _leftovers(directory: Path, names: Iterable[str], kind: str) -> list[tuple[Path, str]]:
    """The entries of ``directory`` named as pst-dist names a temporary of one of ``names`` (``.X.<kind>-<writer>``),
    with their writer: ``<host>+<pid namespace>-<pid>`` (:func:`_writer`), or ``<pid>`` before it named a host."""
    pattern = re.compile(rf"\.(.+)\.{re.escape(kind)}-([A-Za-z0-9._-]+\+\d+-\d+|\d+)")
    names = set(names)
    entries = sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []
    return [(p, m.group(2)) for p in entries for m in [pattern.fullmatch(p.name)] if m and m.group(1) in names]


def _this_machines(writer: str) -> int | None:
    """The process id of a temporary's writer on this machine (:func:`_machine`); None for another's."""
    m = re.fullmatch(rf"{re.escape(_machine())}-(\d+)", writer)
    return int(m.group(1)) if m else None


def stale_leftovers(directory: Path, names: Iterable[str], kind: str) -> list[Path]:
    """What writes of ``names`` into ``directory`` left when their process was killed (SIGKILL, the OOM killer,
    a lost node): hidden temporary files (``kind`` "tmp", :func:`save_atomic`), partial directories ("partial",
    :func:`atomic_dir`) or earlier outputs moved aside by a replacement ("old", :func:`atomic_dir`), named with this
    machine and a process id that no longer runs here. A name from another machine, or of a process still running,
    is never one."""
    return [p for p, writer in _leftovers(directory, names, kind)
            if (pid := _this_machines(writer)) is not None and not _running(pid)]


def unclaimed_leftovers(directory: Path, names: Iterable[str], kind: str) -> list[Path]:
    """The names :func:`stale_leftovers` looks for, of ``names`` and ``kind``, that it can never take: written on
    another machine (or in another container of this host), or named by an older pst-dist with a process id alone
    (``.X.old-<pid>``). Whether their writer still runs cannot be known from here, so they are never removed; an
    "old" one may hold the only copy of an earlier output."""
    return [p for p, writer in _leftovers(directory, names, kind) if _this_machines(writer) is None]


_NAMED: set[Path] = set()
"""The :func:`unclaimed_leftovers` :func:`remove_stale` has named in this process."""


def remove_stale(directory: Path, names: Iterable[str], kind: str) -> list[str]:
    """Remove :func:`stale_leftovers` (pst-dist's own names, of killed writes), saying so on stderr; their names.
    Those it cannot judge (:func:`unclaimed_leftovers`) are named on stderr and left."""
    removed = []
    for p in stale_leftovers(directory, names, kind):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p.name)
    if removed:
        print(f"[pst-dist] removed {', '.join(removed)} from {directory}: left by a write that was killed",
              file=sys.stderr)
    if left := [p for p in unclaimed_leftovers(directory, names, kind) if p not in _NAMED]:  # said once a process
        _NAMED.update(left)  # (a checkpoint's save looks at each epoch)
        print(f"[pst-dist] left {', '.join(p.name for p in left)} in {directory}: written on another machine, or "
              f"named by an older pst-dist (a process id alone), so pst-dist cannot tell whether that write still "
              f"runs; remove {'it' if len(left) == 1 else 'them'} once none does", file=sys.stderr)
    return removed


def _publish_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if nothing is at ``path`` (a hard link fails on an existing name: no window
    between the check and the move); OutputError naming ``path`` otherwise. Where the file system has no hard links,
    a check just before the rename."""
    appeared = OutputError(f"{path}: appeared while pst-dist was writing it; left as it is (the new output is "
                           f"discarded): move it away and run again")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError:  # no hard links here (some network and FUSE file systems)
        if path.exists() or path.is_symlink():
            raise appeared from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync(path: Path) -> None:
    """Flush ``path``'s data (a file) or its entries (a directory) to the disk; where the file system cannot
    (some network and FUSE ones refuse a directory's fsync), nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS, errno.EACCES):
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folder's own entries to the disk (see :func:`_fsync`)."""
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and not f.is_symlink():
            _fsync(f)
    _fsync(Path(folder))


def save_atomic(path: Path, write: Callable[[Path], None], *, new: bool = False) -> None:
    """``write(tmp)`` to a hidden temporary file beside ``path``, then rename it to ``path``. On any failure (an
    exception, a full disk, Ctrl-C) the temporary file is removed and ``path`` is left as it was. ``new``: ``path``
    was absent when the command checked it, and a file that appeared there since (a user's) is not replaced."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        _fsync(tmp)  # on disk before its name is: a node that loses power never publishes an empty file
        if new:
            _publish_new(tmp, path)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # name the file being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


class _RecordingFile:
    """A binary file whose ``write`` remembers the OSError it raised: libraries that write through a file object
    (torch.save) turn that error into their own RuntimeError; :func:`save_stream_atomic` raises the real one."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_stream_atomic(path: Path, write: Callable[[object], None]) -> None:
    """``write(f)`` into a binary file object, atomically as :func:`save_atomic`; a failed disk write (a full
    disk) is raised as its OSError even when ``write`` (e.g. ``torch.save``) wraps it in another exception."""

    def go(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            rec = _RecordingFile(f)
            try:
                write(rec)
            except Exception:
                if rec.error is not None:
                    raise rec.error from None
                raise

    save_atomic(path, go)


def write_atomic(path: Path, text: str, *, new: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`save_atomic`, and its ``new``)."""
    save_atomic(Path(path), lambda p: p.write_text(text, encoding="utf-8"), new=new)


PLOT_SOFTWARE = "pst-dist"
"""The PNG ``Software`` text pst-dist's plots carry: a plot file it may replace (:func:`is_our_png`)."""


def savefig_atomic(fig, path: Path, *, new: bool = False, **kw) -> None:
    """``fig.savefig`` through a temporary file (the format follows ``path``'s suffix); a PNG is marked as
    pst-dist's (:data:`PLOT_SOFTWARE`). ``new``: see :func:`save_atomic`."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if fmt == "png":
        kw.setdefault("metadata", {"Software": PLOT_SOFTWARE})
    save_atomic(Path(path), lambda p: fig.savefig(p, format=fmt, **kw), new=new)


def is_our_png(path: Path) -> bool:
    """Whether ``path`` is a PNG that pst-dist wrote: its ``Software`` text is :data:`PLOT_SOFTWARE`. A photo,
    another program's image or a user's own matplotlib figure (``Matplotlib version ...``) is not."""
    from PIL import Image  # matplotlib's dependency; only where a plot file is in the way

    try:
        with Image.open(path) as im:
            said = str(im.text.get("Software", "")) if im.format == "PNG" else ""
            return said == PLOT_SOFTWARE
    except (OSError, ValueError):
        return False


def json_lines(f: Path) -> list[tuple[str, dict]]:
    """The (line, record) pairs of a JSON-lines file a run writes, but a line torn by a kill (bytes cut mid-character
    included): it is not JSON, or not an object."""
    pairs = []
    for line in Path(f).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            pairs.append((line, row))
    return pairs


def read_json(path: Path, what: str, error: type[Exception] = OutputError) -> dict:
    """A JSON object from ``path``, or ``error`` naming the file and what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer past Python's digit limit, deep nesting
        raise error(f"{path}: {what} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: {what} is not a JSON object (found {type(obj).__name__})")
    return obj


def check_out_dir(out: Path, *, command: str, marker: str, owned: Iterable[str], overwrite: bool,
                  is_ours: Callable[[Path], bool] | None = None) -> bool:
    """May ``command`` write its output directory at ``out``? Returns whether an earlier output is there (to be
    replaced). Raises OutputError, naming ``out`` and what is in the way, when:

    - ``out`` is a file (or anything but a directory);
    - ``out`` is a non-empty directory that is not an earlier output of ``command`` (no ``marker`` file, or
      ``is_ours(out)`` is false), e.g. the data set's own directory: nothing in it is touched;
    - it is an earlier output but holds entries ``command`` does not write (``owned``): they would be lost;
    - it is an earlier output and ``overwrite`` is false.
    """
    out = Path(out)
    _refuse_current_dir(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"--out {out}: exists and is not a directory; choose another --out")
    try:
        entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    except OSError as e:
        raise OutputError(f"--out {out}: cannot list it ({e.strerror or e})") from None
    if not entries:
        # killed between a replacement's two renames (here, on another machine, or under an older pst-dist's name)
        hidden = [*stale_leftovers(out.parent, [out.name], "old"), *unclaimed_leftovers(out.parent, [out.name], "old")]
        if hidden:
            raise OutputError(f"--out {out}: {'empty' if out.exists() else 'absent'}, but {hidden[0]} holds the "
                              f"earlier output, which a killed replacement had moved aside: move it back "
                              f"({'rmdir ' + str(out) + ' && ' if out.exists() else ''}mv {hidden[0]} {out}) or "
                              f"remove it, then run again")
        return False
    ours = (out / marker).is_file() and (is_ours is None or is_ours(out))
    if not ours:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise OutputError(f"--out {out}: not empty and not an earlier `pst-dist {command}` output (it holds {shown}); "
                          f"refusing to touch it: choose an empty or new directory")
    foreign = [e for e in entries if e not in set(owned)]
    if foreign:
        raise OutputError(f"--out {out}: holds an earlier `pst-dist {command}` output but also {foreign}, which "
                          f"pst-dist did not write; move them away or choose another --out")
    if not overwrite:
        raise OutputError(f"--out {out}: holds an earlier `pst-dist {command}` output; pass --overwrite to replace "
                          f"it, or choose another --out")
    return True


def load_failure(e: BaseException) -> str:
    """Why ``torch.load`` (or another reader) failed, in one line for an error message: torch's weights-only refusal
    as its reason alone, without its advice to load the file unrestricted (which runs whatever code it holds)."""
    text = str(e)
    if "Weights only load failed" in text:  # torch's wording moves between versions: find the reason by content
        after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        found = re.search(r"(?:Unsupported|Trying to load unsupported)(?:[^\n.]|\.(?=\S))*", after or text)
        reason = " ".join((found.group(0) if found else after).split()[:40])
        return f"a weights-only load refuses it: {reason or 'content other than tensors and plain values'}"
    return f"{type(e).__name__}: {one_line(e)}"


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut at ``limit`` characters: the part of an error message a library wrote."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_parent_dir(path: Path, option: str) -> None:
    """OutputError unless the folder a file output ``path`` goes into exists: checked before the work, not found
    when the temporary file cannot be written after it."""
    if not Path(path).parent.is_dir():
        raise OutputError(f"{option} {path}: {Path(path).parent} is not a directory; create it or choose another "
                          f"{option}")
    if not os.access(Path(path).parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {Path(path).parent} is not writable; choose another {option}")


def _refuse_current_dir(out: Path) -> None:
    """OutputError for an ``out`` that is the current directory or one holding it (``.``, ``..``, ``nope/..``): the
    output, renamed into place, would pull the shell's directory away."""
    here = Path.cwd().resolve()
    if (where := Path(os.path.abspath(out)).resolve()) == here or where in here.parents:
        raise OutputError(f"--out {out}: is the current directory or one holding it; name a directory inside it")


def check_written_over(out: Path, names: Iterable[str], ours: bool, *, option: str, command: str,
                       missing: str) -> None:
    """A folder a command reuses (bench.out, demo --out: it may hold anything else) and writes ``names`` into, over
    what is there: refused (OutputError, naming them) when some are there and ``ours`` (an earlier run of ``command``
    left its record beside them) is false, for then no pst-dist wrote them."""
    present = [n for n in names if (Path(out) / n).exists() or (Path(out) / n).is_symlink()]
    if present and not ours:
        raise OutputError(f"{option}={str(out)!r} holds {', '.join(present)}, which {command} writes, but {missing}: "
                          f"no pst-dist {command.split()[-1]} wrote them; choose another {option}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside are raised again once it is left (on the main thread, where Python
    runs its handlers; elsewhere nothing to do): for a few renames that must happen together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    before: dict[int, object] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            before[s] = signal.getsignal(s)
            signal.signal(s, lambda signum, frame: got.append(signum))
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(got):  # each one, in the order they came, to the handler it had: KeyboardInterrupt,
            signal.raise_signal(s)  # Terminated, or the default


@contextlib.contextmanager
def atomic_dir(out: Path, *, replace: bool = False, owned: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a fresh hidden sibling directory of ``out`` to fill; on success it is renamed to ``out``. ``out`` must be
    absent or empty, or ``replace`` (checked by :func:`check_out_dir`) must be true: the earlier output is then
    renamed aside and removed only after the new one is in place; with ``owned`` (the names the command writes) only
    if it still holds nothing else, for a file put there while the work ran is not the earlier output's. On any
    failure the partial directory is removed and ``out`` is as it was."""
    _refuse_current_dir(out)
    out = Path(os.path.abspath(out))  # "x/." or "x/..": a sibling of the directory itself, not one inside it
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # what this call creates, deepest first
    tmp = out.parent / f".{out.name}.partial-{_writer()}"
    remove_stale(out.parent, [out.name], "partial")  # a killed run's partial output for this --out, not a live one's
    shutil.rmtree(tmp, ignore_errors=True)  # our own name, from a killed run of this very process id
    for attempt in range(3):  # a parallel job that failed may remove a shared parent, left empty, between the mkdirs
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.mkdir()
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        yield tmp
        fsync_tree(tmp)  # on disk before the output's name is (see save_atomic)
        if out.exists() and any(out.iterdir()):
            if not replace:
                raise OutputError(f"--out {out}: appeared while writing; left as it is")
            if owned is not None and (added := sorted(p.name for p in out.iterdir() if p.name not in set(owned))):
                raise OutputError(f"--out {out}: {added} appeared in it while writing, which pst-dist did not "
                                  f"write; nothing replaced, the new output discarded: move them away and run again")
            old = out.parent / f".{out.name}.old-{_writer()}"
            with signals_deferred():  # a Ctrl-C between the renames would leave no output, the old one hidden
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)
                    raise
                shutil.rmtree(old, ignore_errors=True)  # before a deferred SIGTERM's default action ends the process
        else:
            os.replace(tmp, out)  # rename(2) replaces an empty directory
        _fsync(out.parent)
        # an earlier output a killed replacement had moved aside (check_out_dir refused while --out was absent or
        # empty): superseded only now that this output is in its place
        remove_stale(out.parent, [out.name], "old")
    except BaseException:  # a refused or failed run leaves no folders behind it: only those it made, if empty
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a directory (``path`` could then never be created),
    else None."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def uncreatable(path: Path) -> str | None:
    """Why the directory ``path`` could not be created or written into (an ancestor that is a file, or the nearest
    existing one not writable), or None."""
    if (blocker := blocking_ancestor(path)) is not None:
        return f"{blocker} is a file, not a directory"
    p = next(a for a in (Path(path).absolute(), *Path(path).absolute().parents) if a.exists())
    return None if os.access(p, os.W_OK | os.X_OK) else f"{p} is not writable"


def enter_out_dir(stack: contextlib.ExitStack, out: Path, replace: bool, owned: Iterable[str] | None = None) -> Path:
    """Enter :func:`pst_dist.io.atomic_dir` for ``out`` on ``stack`` and return the directory to fill. Done before
    the expensive work, so that an --out that cannot be created (a file in its path, no permission, a read-only
    disk) is an OutputError naming it at once, not after hours of generating."""
    if (blocker := blocking_ancestor(out)) is not None:
        raise OutputError(f"--out {out}: {blocker} is a file, not a directory; choose another --out")
    try:
        return stack.enter_context(atomic_dir(out, replace=replace, owned=owned))
    except OSError as e:
        raise OutputError(f"--out {out}: cannot be written there ({e.strerror or e}: {e.filename})") from None


def write_failed(out: Path, e: OSError) -> OSError:
    """A failed write into ``out``'s partial directory (already removed by atomic_dir), as one OSError naming
    ``out``: numpy and FFCV report a full disk as a bare count of bytes written."""
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "requested and" in str(e)  # numpy's short write
    hint = " (a full disk or a file size limit?)" if full else ""
    return OSError(e.errno, f"writing it failed: {e.strerror or e}{hint}; an earlier output there is unchanged",
                   str(out))


def die_with_parent(parent: int) -> None:
    """Linux: end this process (SIGKILL) when ``parent``, the process that started it, ends, however it ends (a
    SIGTERM from a scheduler, an OOM kill): a bench's pool worker or a .beton writer never outlives its command to
    go on writing (a rerun would train the same cells beside it). Call first thing in the child; elsewhere it does
    nothing. The kernel ties this to the thread that started the child: start children from the main thread. A
    child started by another process (a forkserver) is not tied (the signal would come from that process)."""
    if not sys.platform.startswith("linux") or os.getppid() != parent:  # not its child (a forkserver's): no tie
        return
    import ctypes  # only where a pool or writer process starts (Linux)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        set_pdeathsig = 1  # PR_SET_PDEATHSIG
        if libc.prctl(set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no prctl: as on other systems
        return
    if os.getppid() != parent:  # it ended before the call: the signal will not come
        os.kill(os.getpid(), signal.SIGKILL)

