"""The ``placer`` command group and its entry point: error triage and signals.

Bad input exits 2 with one line naming the input and the problem; unexpected errors exit 1.
Neither prints a traceback unless ``--debug`` is given. SIGINT exits 130 and SIGTERM 143, both
after removing temp files and stopping worker processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback

import click

from placer.cli.apply import apply
from placer.cli.demo import demo
from placer.cli.options import CONTEXT
from placer.cli.placement import evaluate, export, solve
from placer.cli.profile import profile
from placer.cli.report import report
from placer.cli.routing import stats, synth
from placer.cli.serve import serve
from placer.cli.simulate import simulate
from placer.errors import (
    ClusterError,
    InfeasibleError,
    InvalidInputError,
    MissingDependencyError,
    PlacerError,
)


@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks (anywhere on the line).")
@click.version_option(package_name="placer")
def cli(debug: bool) -> None:
    """placer: expert placement for Mixture-of-Experts serving.

    \b
    Example:
        placer synth --model mixtral-8x7b --tokens 20000 -o trace.npz
        placer stats trace.npz
        placer solve trace.npz --gpus 4 --method contiguous -o p.json --export sglang=s.json
        placer evaluate p.json trace.npz
    """

for _command in (synth, stats, solve, evaluate, export, profile, report, simulate, serve, apply, demo):
    cli.add_command(_command)


# ---------------------------------------------------------------------------------------------
# Entry point: error triage
# ---------------------------------------------------------------------------------------------

_NUMBA_CODE = (os.sep + "numba" + os.sep, os.sep + "llvmlite" + os.sep)


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _after_numba(frame):
    """The frame that called into numba when numba or llvmlite is anywhere on the stack (numba
    compiling or loading a kernel, or the Python helper a compiled kernel calls to box its
    result, whatever library code those call); else None."""
    caller = None
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _NUMBA_CODE):
            caller = frame.f_back  # ends as the caller of the outermost numba frame
        frame = frame.f_back
    return caller


@contextlib.contextmanager
def interrupts_as_exceptions():
    """SIGINT raises ``KeyboardInterrupt`` and SIGTERM ``SystemExit(143)`` (in the main thread),
    so that both unwind alike: temp files are removed and worker processes stopped. The previous
    handlers come back after.

    Neither is raised inside numba or llvmlite: in the Python helper a numba kernel calls to box
    its result an exception crashes the process (SIGSEGV; numba 0.68), and during a compilation
    it leaves half-built LLVM objects that print tracebacks as they are collected. It is raised
    instead at the next line of the code that called into numba, through a one-shot trace
    function (or, when a tracer such as coverage is active, by sending the signal again 5 ms
    later).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        caller = _after_numba(frame)
        if caller is None:
            raise _signal_exception(signum)
        if sys.gettrace() is not None:  # another tracer: do not replace it
            retry = threading.Timer(0.005, os.kill, (os.getpid(), signum))
            retry.daemon = True
            retry.start()
            return

        def at_next_line(traced, event, arg):
            sys.settrace(None)
            caller.f_trace = None
            raise _signal_exception(signum)

        caller.f_trace = at_next_line
        sys.settrace(lambda *args: None)  # turns tracing on; new frames stay untraced

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with one line, unexpected errors exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (before a "--"), as if given before the command
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    if debug:
        args = ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]
    try:
        with interrupts_as_exceptions():
            cli.main(args=args, prog_name="placer", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__cause__, KeyboardInterrupt):
            click.echo("placer: interrupted", err=True)  # temp files removed, workers stopped
            return 130
        click.echo("placer: aborted", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
        if no_args and isinstance(exc, no_args):
            exc.show()  # a bare group: its help
        else:
            click.echo(f"placer: error: {_one_line_text(exc.format_message())}", err=True)
        return exc.exit_code
    except (InvalidInputError, InfeasibleError, MissingDependencyError, ClusterError) as exc:
        if debug:
            traceback.print_exc()
        for line in getattr(exc, "flags", ()):  # e.g. vLLM's own EPLB flags when it loads no file
            click.echo(f"  {line}")
        click.echo(f"placer: error: {_one_line(exc)}", err=True)
        return 1 if isinstance(exc, ClusterError) else 2  # the cluster: not the input, not a bug
    except (PlacerError, Exception) as exc:  # unexpected: a bug, or the environment
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        click.echo(f"placer: unexpected error: {type(exc).__name__}: {_one_line(exc)}{hint}", err=True)
        return 1
    return 0


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

