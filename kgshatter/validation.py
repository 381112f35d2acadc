"""Validation helpers shared by every frozen config: errors name the value and the allowed range."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

T = TypeVar("T")


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in ``[minimum, maximum]``.

    >>> check_int("n_layers", 2, 1)
    >>> check_int("n_layers", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: n_layers must be an integer >= 1, got 0
    """
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {allowed}, got {value}")


DEVICE_TYPES = ("cpu", "cuda", "mps", "meta")


def resolve_device(device: Any) -> Any:
    """``device`` (``None``: the CPU) as a ``torch.device``, refused with one line when it is
    malformed or not available on this machine, before any work.

    >>> str(resolve_device(None)), str(resolve_device("meta"))
    ('cpu', 'meta')
    >>> resolve_device("nosuch")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'nosuch': use one of cpu, cuda, cuda:N, mps, meta
    """
    import torch

    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"unknown device {device!r}: use one of cpu, cuda, cuda:N, mps, meta"
        ) from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(
            f"device {device!r} is not supported: use one of cpu, cuda, cuda:N, mps, meta"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(
                f"device {device!r} asked for, but CUDA is not available here (torch "
                f"{torch.__version__}, {build}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): use cuda:0..cuda:"
                f"{torch.cuda.device_count() - 1}"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def check_float(name: str, value: Any, minimum: float, *, inclusive: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number above ``minimum``."""
    op = ">=" if inclusive else ">"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {op} {minimum}, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"{name} must be a finite number {op} {minimum}, got {value}")


def check_fraction(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``.

    >>> check_bool("tied_embeddings", "yes")
    Traceback (most recent call last):
    ...
    ValueError: tied_embeddings must be true or false, got 'yes'
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class ConfigDict:
    """``to_dict`` / ``from_dict`` for frozen config dataclasses (JSON round-trip)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: tuples become lists (``from_dict`` turns them back)."""
        return _listify(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        return config_from_dict(cls, data)


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


def config_from_dict(cls: type[T], data: Any) -> T:
    """Build a frozen dataclass from a dict, naming unknown keys instead of dropping them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} needs a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)
