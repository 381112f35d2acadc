"""The editing sweep on a Ray cluster: each worker an actor holding the model and statistics.

``run_sweep(..., workers=N)`` (``kgshatter reproduce --workers N``) starts a local Ray cluster
of N workers; ``ray_address=ADDR`` (``--ray-address ADDR``) joins an existing one, e.g. one
started with ``ray start --head`` on a GPU machine and ``ray start --address ...`` on the
others. Each actor builds its context once (the sweep passes
:func:`kgshatter.studies.sweep.sweep_context`, which loads the run, its cached statistics and the
unedited representations) and then takes units of work one at a time; the driver hands out
the units, and is the only process writing ``rows.jsonl``. The sweep's editing methods are sent
to the workers, so one added with :func:`kgshatter.editing.register_method` in the driver runs
there too (its functions must be picklable by Ray's cloudpickle). Ray is an optional extra:
``pip install 'kgshatter[ray]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from kgshatter.editing import Method

log = logging.getLogger(__name__)

Unit = TypeVar("Unit")
Result = TypeVar("Result")
Unit_contra = TypeVar("Unit_contra", contravariant=True)
Result_co = TypeVar("Result_co", covariant=True)


class Context(Protocol[Unit_contra, Result_co]):
    """What a worker holds: anything that runs one unit of work into its result."""

    def run_unit(self, unit: Unit_contra) -> Result_co: ...


INSTALL_HINT = "pip install 'kgshatter[ray]' (or pip install ray)"


def require_ray() -> Any:
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            f"--workers / --ray-address need Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


class SweepWorker(Generic[Unit, Result]):
    """A Ray actor: one context, built once by ``make_context(*context_args)``, running units.

    This module knows nothing of the sweep: any context with a ``run_unit(unit) -> result``
    method runs here (the sweep's is :class:`~kgshatter.studies.sweep.SweepContext`, whose
    units are :class:`~kgshatter.studies.sweep.SweepUnit` and results lists of table rows)."""

    def __init__(
        self,
        make_context: Callable[..., Context[Unit, Result]],
        context_args: tuple[Any, ...],
        threads: int,
        methods: dict[str, Method],
    ) -> None:
        import torch

        from kgshatter.editing import METHODS, register_method

        torch.set_num_threads(threads)
        for name, method in methods.items():  # methods registered in the driver only
            if METHODS.get(name) != method:
                register_method(method, replace=True)
        self.context = make_context(*context_args)

    def run_unit(self, unit: Unit) -> Result:
        return self.context.run_unit(unit)


def run_units(
    units: list[Unit],
    make_context: Callable[..., Context[Unit, Result]],
    context_args: tuple[Any, ...],
    finished: Callable[[Unit, Result | BaseException], None],
    *,
    methods: list[str],
    workers: int | None = None,
    address: str | None = None,
    threads: int = 1,
) -> None:
    """Run ``units`` on Ray actors, calling ``finished(unit, result or error)`` in this process
    as each one completes (in completion order). Each actor builds its context once with
    ``make_context(*context_args)`` (a module-level function, pickled by reference); the editing
    ``methods`` named are sent along, so a method registered only in this process runs there.
    ``workers``: actors to start (default: one per CPU of the cluster); ``address``: an
    existing cluster (``None``: a local one, shut down afterwards). A unit whose worker raises
    is passed on as its exception; a worker that dies is replaced once per unit before the
    unit counts as failed."""
    ray = require_ray()
    if not units:
        return
    started = not ray.is_initialized()
    if started:
        if address is not None:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(n, len(units))
        actor_class = ray.remote(num_cpus=1)(SweepWorker)
        from kgshatter.editing import get_method

        # the sweep's methods travel to the workers (pickled): one registered with
        # register_method in this process runs there too
        sent = {name: get_method(name) for name in methods}

        def new_actor() -> Any:
            return actor_class.remote(make_context, context_args, threads, sent)

        actors = [new_actor() for _ in range(n)]
        log.info("sweep: %d units of work on %d Ray workers", len(units), n)
        queue = list(units)
        running: dict[Any, tuple[Any, Unit, int]] = {}

        def submit(actor: Any, unit: Unit, tries: int = 0) -> None:
            running[actor.run_unit.remote(unit)] = (actor, unit, tries)

        for actor in actors:
            if queue:
                submit(actor, queue.pop(0))
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, unit, tries = running.pop(ref)
            try:
                result: Result | BaseException = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # the worker died: a fresh one retries
                if tries == 0:
                    actor = new_actor()
                    submit(actor, unit, tries + 1)
                    continue
                result = err
            except ray.exceptions.RayTaskError as err:  # the unit raised inside the worker
                result = err
            finished(unit, result)
            if queue:
                submit(actor, queue.pop(0))
    finally:
        if started:
            ray.shutdown()
