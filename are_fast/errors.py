"""How every ``are-fast`` job ends: one line on stderr and an exit code, never a raw traceback.

    exit 0    done
    exit 2    usage or input error (a bad option, model, data file or output folder), found before the work
    exit 1    failure at run time (a write fails, the disk is full, an internal error); finished outputs are kept
    exit 130  SIGINT (Ctrl-C) / 143 SIGTERM: the job stopped after its current step or batch

Jobs raise ``ValueError`` / ``TypeError`` for input errors, ``RunFailure`` or ``OSError`` at run time and
``Interrupted`` on a signal; ``run_guarded`` turns each into its line and exit code. ``ARE_FAST_TRACEBACK=1``
prints the traceback too (for bug reports). ``StopSignals`` lets a loop finish its current step on SIGINT or
SIGTERM instead of dying in the middle of a write.
"""
from __future__ import annotations

import contextlib
import errno
import os
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
    """Create ``folder`` if needed and write (then remove) a probe file in it, so a job finds out that it cannot
    save its outputs before it computes them. ValueError (exit 2) naming ``option`` when it cannot."""
    probe = os.path.join(folder, f".are_fast-write-check-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(probe)
        raise ValueError(os_error_line(err, f"{option}: cannot write to {folder!r}", show_path=False)) from None


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
    except Interrupted as err:
        line, code = f"{prefix}: {err}", 128 + err.signum
    except KeyboardInterrupt:
        line, code = f"{prefix}: interrupted{tail}", 128 + signal.SIGINT
    except (ValueError, TypeError) as err:
        line, code = f"{prefix}: error: {err}", USAGE
    except RunFailure as err:
        line, code = f"{prefix}: error: {err}", FAILURE
    except OSError as err:
        line, code = f"{prefix}: error: {os_error_line(err, 'a file operation failed')}{tail}", FAILURE
    except Exception as err:  # noqa: BLE001 - the last resort: one line, the traceback on request
        if _safetensors_error(err):
            line = f"{prefix}: error: writing a safetensors file failed: {err}{tail}"
        else:
            line = (f"{prefix}: internal error: {type(err).__name__}: {err} "
                    "(ARE_FAST_TRACEBACK=1 prints the traceback; please report it)")
        code = FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if os.environ.get("ARE_FAST_TRACEBACK") == "1":
        traceback.print_exc()
    print(line.replace("\n", " "), file=sys.stderr, flush=True)
    return code


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
