"""The jobs' run-time helpers: how a job ends (``run_guarded``: exit 0, 2 for input errors, 1 at run time,
130/143 on a signal, one line on stderr, never a raw traceback), ``StopSignals`` (finish the current step on
SIGINT/SIGTERM), write checks and ``written_atomically``. README "Faults" has the table."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import traceback
from typing import Callable

USAGE, FAILURE = 2, 1


class RunFailure(RuntimeError):
    """The job failed at run time (exit 1); the message says what was kept and how to go on."""


class Interrupted(Exception):
    """The job stopped on a signal after a consistent point; exit 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def os_error_line(err: OSError, doing: str, show_path: bool = True) -> str:
    """'<doing>: <reason> (<path>)' with the fix for the usual errnos (full disk, read-only or forbidden folder)."""
    path = f" ({err.filename})" if show_path and getattr(err, "filename", None) else ""
    reason = err.strerror or str(err)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EROFS: "choose a writable folder", errno.EACCES: "choose a folder you can write to",
            errno.EPERM: "choose a folder you can write to"}.get(err.errno)
    return f"{doing}: {reason}{path}" + (f"; {hint}" if hint else "")


def check_writable(folder: str, option: str) -> None:
    """Find out that ``folder`` can be written before a job computes anything: a probe file is written (then
    removed) in it, or, while it does not exist, in its nearest existing parent (where creating it would write).
    Nothing is created, so a job that stops later with exit 2 leaves no folder behind. ValueError (exit 2)
    naming ``option`` when it cannot be written."""
    target = os.path.abspath(folder)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    where = f"{option}: cannot write to {folder!r}"
    if not os.path.isdir(target):
        raise ValueError(f"{where}: {target!r} is a file, not a folder; choose another folder")
    probe = os.path.join(target, f".are_fast-write-check-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(probe)
        raise ValueError(os_error_line(err, where, show_path=False)) from None


@contextlib.contextmanager
def writing(what: str, kept: str):
    """Turn a failed write (OSError, safetensors' I/O error) into one RunFailure line: what failed, why, what is
    kept and how to go on."""
    try:
        yield
    except OSError as err:
        raise RunFailure(f"{os_error_line(err, what)}; {kept}") from None
    except Exception as err:
        if not _safetensors_error(err):
            raise
        raise RunFailure(f"{what}: {err}; {kept}") from None


@contextlib.contextmanager
def written_atomically(path: str):
    """Yield a temporary path beside ``path`` to write a file or a folder to; on success it replaces ``path`` (a
    folder there is removed first), on an error it is removed, so ``path`` is never half written."""
    tmp = f"{path}.tmp"
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _safetensors_error(err: BaseException) -> bool:
    return type(err).__name__ == "SafetensorError"  # safetensors' Rust error type (I/O errors included)


def run_guarded(command: str, job: Callable[[], int | None], resume_hint: str = "") -> int:
    """Run ``job``; return its exit code (0 when it returns None). Errors print one line ``are-fast COMMAND: ...``.

    resume_hint: appended to run-time failures and interrupts, e.g. "rerun the same command to resume".
    """
    prefix = f"are-fast {command}"
    tail = f"; {resume_hint}" if resume_hint else ""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if _main_thread() else None
    try:
        code = job()
        return 0 if code is None else int(code)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every ending gets its line
        line, code = _ending(prefix, tail, err)
        trace = traceback.format_exc()  # here, while the exception is being handled
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if os.environ.get("ARE_FAST_TRACEBACK") == "1":
        print(trace, end="", file=sys.stderr, flush=True)
    print(line.replace("\n", " "), file=sys.stderr, flush=True)
    return code


def _ending(prefix: str, tail: str, err: BaseException) -> tuple[str, int]:
    """The one line and the exit code for a job that raised ``err``."""
    if isinstance(err, Interrupted):
        return f"{prefix}: {err}", 128 + err.signum
    if isinstance(err, KeyboardInterrupt):
        return f"{prefix}: interrupted{tail}", 128 + signal.SIGINT
    if isinstance(err, (ValueError, TypeError)):
        return f"{prefix}: error: {err}", USAGE
    if isinstance(err, RunFailure):
        return f"{prefix}: error: {err}", FAILURE
    if isinstance(err, OSError):
        return f"{prefix}: error: {os_error_line(err, 'a file operation failed')}{tail}", FAILURE
    if _safetensors_error(err):
        return f"{prefix}: error: writing a safetensors file failed: {err}{tail}", FAILURE
    return (f"{prefix}: internal error: {type(err).__name__}: {err} "
            "(ARE_FAST_TRACEBACK=1 prints the traceback; please report it)"), FAILURE


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum, frame):
    raise Interrupted(signum, "terminated (SIGTERM); the finished outputs are kept: rerun the same command")


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGINT and SIGTERM only set ``stop.signum``; the loop checks it
    after each step and ends cleanly. A second signal raises at once (KeyboardInterrupt / Interrupted)."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Interrupted(signum, "terminated twice; stopped at once (the last finished checkpoint is kept)")
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if _main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> bool:
        """Whether any process of the run got a signal (one all-reduce under torch.distributed), so that all
        ranks stop after the same step."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([self.signum or 0], dtype=torch.int64,
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def interrupted(self, where: str, hint: str = "rerun the same command to resume") -> Interrupted:
        name = signal.Signals(self.signum).name if self.signum else "signal"
        return Interrupted(self.signum or signal.SIGINT, f"interrupted ({name}) {where}; {hint}")
