"""The ``kgshatter`` command line: one module per family of commands (``training``,
``studies``, ``editing``), each only parsing arguments, calling the library or a study and
printing; ``common`` holds what they share.

Errors in user input print one line naming the problem and exit with status 2; nothing on disk
is overwritten.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from kgshatter.cli import editing, studies, training
from kgshatter.cli.common import _one_line, _Parser, default_threads
from kgshatter.presets import apply_overrides

# the names scripts and tests import from kgshatter.cli
__all__ = ["apply_overrides", "build_parser", "default_threads", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kgshatter",
        description="Representation shattering under knowledge edits (arXiv 2410.17194) on "
        "TransformerLens: train a model on a structured knowledge graph, edit its knowledge "
        "and measure what the edits do to its representations.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log debug and library messages"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    training.add_train(sub)
    training.add_evaluate(sub)
    studies.add_reproduce(sub)
    editing.add_edit(sub)
    editing.add_edit_benchmark(sub)
    studies.add_months(sub)
    editing.add_benchmark(sub)
    studies.add_study(sub)
    return parser


def _log_phases(verbose: bool) -> logging.Handler:
    """kgshatter's phase messages ("resuming from step 2000", "computing the second moment
    ...") on stderr at the default level; ``--verbose`` adds debug messages and other
    libraries' information."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kgshatter: %(message)s"))
    logger = logging.getLogger("kgshatter")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return handler


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM ends a command like Ctrl-C does: finished work stays, the message says so."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line, status 2) or --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    logger = logging.getLogger("kgshatter")
    saved = (logger.level, logger.propagate)  # restored on exit: main() may run in-process
    handler = _log_phases(args.verbose)
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if getattr(args, "device", None) is not None:  # refused before any work
            from kgshatter.validation import resolve_device

            resolve_device(args.device)
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, MemoryError, ImportError) as e:
        print(f"kgshatter {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk full, a permission the checks could not foresee
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"kgshatter {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"kgshatter {args.command}: interrupted; what was finished is saved (checkpoints, "
            f"sweep rows): rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
