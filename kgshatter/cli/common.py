"""What every command shares: argument types and options, threads, formatting."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, NoReturn

from kgshatter.kg.graph import roman
from kgshatter.kg.walks import SPLITS

if TYPE_CHECKING:
    pass


ROMAN_ORDER = {roman(i): i for i in range(1, 40)}


# kgshatter reproduce --geometry NAME: the preset that trains each geometry (README, "Other
# geometries")
GEOMETRY_PRESETS = {
    "ring": "cpu", "torus": "torus", "grid": "grid", "mixed": "mixed", "tree": "tree",
    "ring-tree": "ring-tree",
}  # fmt: skip


def default_threads() -> int:
    """Half the CPU cores this process may use, at least 1 (one on a 2-core machine).

    torch's default (every core) collapses as soon as another process wants a core: on 2 cores
    a training step of the ``cpu`` preset ran 3.5x slower at 2 threads beside one busy process
    and 1.3x faster alone (docs/speed.md, "Threads").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _whole(minimum: int) -> Any:
    """An argparse type: a whole number >= ``minimum`` (the error names the allowed range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


_positive, _natural = _whole(1), _whole(0)


def _order_name(text: str) -> int:
    """An argparse type: an order's name (I, II, III, ...) as its index."""
    name = text.strip().upper()
    if name not in ROMAN_ORDER:
        raise argparse.ArgumentTypeError(
            f"expected an order's name (I, II, III, ...), got {text!r}"
        )
    return ROMAN_ORDER[name] - 1


_order_name.__name__ = "order name"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``kgshatter train: error: ... (kgshatter train --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (``None``: :func:`default_threads`)."""
    import torch

    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be a whole number >= 1, got {threads}")
    torch.set_num_threads(default_threads() if threads is None else threads)


def _distances(text: str, flag: str = "--distance") -> tuple[int, ...]:
    """``"1..3"`` or ``"1,2,3"``; ``""`` is no distance (the tree task).

    >>> _distances("1..4"), _distances("1,3")
    ((1, 2, 3, 4), (1, 3))
    """
    try:
        if ".." in text:
            lo, hi = text.split("..")
            return tuple(range(int(lo), int(hi) + 1))
        return tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"{flag} must look like 1..4 or 1,2,3,4, got {text!r}") from None


def _device_map(text: str | None) -> str | dict[str, Any] | None:
    """``--device-map``: a strategy name (auto, balanced, sequential) or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--device-map is a strategy name or a JSON object: {e}") from None
    return value


def _quiet_hugging_face() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except ImportError:  # transformers without the hub client
        pass


def format_accuracy(acc: dict[str, dict[str, float | None]]) -> str:
    """Accuracy table: tasks as rows, orders as columns."""
    if not acc:
        return "(no evaluation)"
    tasks = [t for t in SPLITS if t in acc] + [t for t in acc if t not in SPLITS]
    orders = sorted(acc[tasks[0]], key=lambda o: (o == "all", ROMAN_ORDER.get(o, 99), o))
    width = max(15, *(len(t) + 1 for t in tasks))
    lines = [f"{'task':<{width}}" + "".join(f"{o:>8}" for o in orders)]
    for task in tasks:
        cells = "".join(f"{_points(acc[task][o]):>8}" for o in orders)
        lines.append(f"{task:<{width}}{cells}")
    return "\n".join(lines)


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_rings(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["structure of each order: ring, lattice or tree (best site per metric)"]
    for order, metrics in summary.items():
        cells = ", ".join(f"{m} {v['value']:.2f} @ {v['site']}" for m, v in metrics.items())
        lines.append(f"  {order}: {cells}")
    return "\n".join(lines)


def _checkpoint_seconds(minutes: float) -> float | None:
    if minutes < 0 or minutes != minutes:
        raise ValueError(f"--checkpoint-minutes must be >= 0 (0: by steps only), got {minutes}")
    return minutes * 60 if minutes > 0 else None


def _checkpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        help="also checkpoint when this many minutes passed since the last checkpoint "
        "(default 5; 0: every train.checkpoint_every steps only)",
    )


def _runtime_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--quiet``, shared by the commands that run a model."""
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch CPU threads (default: half the cores, at least 1; docs/speed.md, 'Threads')",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message from a library is joined)."""
    return " ".join(str(error).split()) or type(error).__name__
