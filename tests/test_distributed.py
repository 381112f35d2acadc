"""The sweep on Ray workers gives the sequential sweep's table; a failing unit is recorded.

Needs the ``ray`` extra (``pip install 'kgshatter[ray]'``, installed by CI); skipped without it
except for the error a missing Ray gives.
"""

from __future__ import annotations

import math
import sys

import pytest

from kgshatter.studies.sweep import SweepConfig, run_sweep

CONFIG = SweepConfig(methods=("rome",), kinds=("counterfactual",), n_edits=2,
                     distances=(1, 2), sequential_edits=2, n_samples=1000, max_queries=16,
                     efficacy_prompts=4)  # fmt: skip


def _comparable(rows):
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "seconds"}
        out.append(r)
    return sorted(out, key=lambda r: (r["method"], r["protocol"], r["sweep_distance"], r["index"]))


def _assert_same(a_rows, b_rows):
    assert len(a_rows) == len(b_rows)
    for a, b in zip(_comparable(a_rows), _comparable(b_rows), strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float) and math.isnan(v):
                assert isinstance(b[k], float) and math.isnan(b[k]), k
            elif isinstance(v, float):
                assert b[k] == pytest.approx(v, abs=1e-6), k
            else:
                assert b[k] == v, k


def test_workers_without_ray_is_one_clear_line(tiny_run_dir, tmp_path, monkeypatch, capsys):
    from kgshatter.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = main(["reproduce", "--preset", "tiny", "--out", str(tmp_path / "r"), "--workers", "2",
                 "--n", "1", "--distances", "1", "--sequential", "0", "--quiet"])  # fmt: skip
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "need Ray" in line and "pip install 'kgshatter[ray]'" in line


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster of 2 CPUs for the module (run_sweep joins it instead of starting one)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_workers_give_the_sequential_table_and_resume(tiny_run_dir, tmp_path, ray_cluster):
    from kgshatter.editing import METHODS, Method, register_method

    sequential = run_sweep(tiny_run_dir, tmp_path / "seq", CONFIG, progress=False)
    spread = run_sweep(tiny_run_dir, tmp_path / "ray", CONFIG, progress=False, workers=2)
    _assert_same(sequential.rows, spread.rows)
    assert (tmp_path / "seq" / "table.csv").read_text().splitlines()[0] == (
        tmp_path / "ray" / "table.csv"
    ).read_text().splitlines()[0]
    # the driver killed midway: half the rows on disk, the last one torn; the rerun resumes
    rows_path = tmp_path / "ray" / "rows.jsonl"
    lines = rows_path.read_text().splitlines()
    rows_path.write_text("\n".join(lines[: len(lines) // 2]) + "\n" + lines[-1][:30])
    again = run_sweep(tiny_run_dir, tmp_path / "ray", CONFIG, progress=False, workers=2)
    keys = [(r["method"], r["protocol"], r["sweep_distance"], r["index"]) for r in again.rows]
    assert len(keys) == len(set(keys)) == len(lines)
    _assert_same(sequential.rows, again.rows)

    # a unit that raises on its worker: its rows hold the error and the sweep goes on. The
    # method is registered in this process only: the workers receive it with the sweep
    from kgshatter.editing.protocols import sample_requests

    graph = sequential_graph(tiny_run_dir)
    (poison,) = sample_requests(graph, "counterfactual", 1, 2, distance=2)  # the d=2 job's first
    rome = METHODS["rome"]

    def flaky(model, task, requests, config, **kw):
        if any((r.subject, r.relation) == (poison.subject, poison.relation) for r in requests):
            raise RuntimeError("this job fails")
        return rome.compute(model, task, requests, config, **kw)

    register_method(Method("flaky", rome.config_class, flaky, rome.presets, False))
    try:
        config = SweepConfig(**{**CONFIG.to_dict(), "methods": ("flaky",),
                                "sequential_edits": 0})  # fmt: skip
        result = run_sweep(tiny_run_dir, tmp_path / "fail", config, progress=False, workers=2)
    finally:
        METHODS.pop("flaky")
    failed = [r for r in result.rows if r["skipped"]]
    assert {r["sweep_distance"] for r in failed} == {2} and len(failed) == 2  # one unit
    assert all(r["skipped"] == "error: RuntimeError: this job fails" for r in failed)
    assert all("efficacy" in r for r in result.rows if r["sweep_distance"] == 1)
    assert result.summary.n_scored == 2
    assert ray_cluster.is_initialized()  # a cluster run_sweep joined is left running
    on_disk = (tmp_path / "fail" / "rows.jsonl").read_text().splitlines()
    assert len(on_disk) == 4


def sequential_graph(run_dir):
    from kgshatter.kg import KnowledgeGraph

    return KnowledgeGraph.load(run_dir / "graph.json")


def test_a_failing_unit_is_recorded_and_the_sequential_sweep_goes_on(tiny_run_dir, tmp_path):
    from kgshatter.editing import METHODS, Method, register_method

    def explode(*args, **kwargs):
        raise RuntimeError("boom on this job")

    rome = METHODS["rome"]
    register_method(Method("explodes", rome.config_class, explode, rome.presets, False))
    try:
        config = SweepConfig(**{**CONFIG.to_dict(), "methods": ("explodes", "rome"),
                                "sequential_edits": 0, "distances": (1,)})  # fmt: skip
        result = run_sweep(tiny_run_dir, tmp_path / "s", config, progress=False)
    finally:
        METHODS.pop("explodes")
    failed = [r for r in result.rows if r["method"] == "explodes"]
    assert [r["skipped"] for r in failed] == ["error: RuntimeError: boom on this job"] * 2
    assert all("efficacy" in r for r in result.rows if r["method"] == "rome")
