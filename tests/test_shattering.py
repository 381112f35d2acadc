"""Shattering metrics, the line fit, the resumable sweep and the reproduce command (tiny)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from kgshatter.analysis.geometry import neighbour_fraction
from kgshatter.analysis.shattering import distance_matrix, fit_line, shattering
from kgshatter.cli import main
from kgshatter.studies.results import SweepSummary
from kgshatter.studies.sweep import SweepConfig, run_sweep


def ring(n=24, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.arange(n) * 2 * torch.pi / n
    x = torch.zeros(n, d)
    x[:, 0], x[:, 1] = torch.cos(theta), torch.sin(theta)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (x.double() @ q), np.arange(n)


def test_shattering_is_zero_on_identity_and_invariant_to_rotation_and_translation():
    x, _ = ring()
    assert shattering(x, x) == 0.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)).double())
    assert shattering(x, x @ q + 7.5) < 1e-12
    y = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).double()
    assert shattering(x, y @ q - 2.0) == pytest.approx(shattering(x, y), abs=1e-12)
    assert shattering(x, 2 * x) == pytest.approx(1.0)  # uniform scaling by 2 doubles D
    torch.testing.assert_close(distance_matrix(x), distance_matrix(x @ q))


def test_shattering_grows_with_noise():
    x, _ = ring()
    levels = [0.01, 0.1, 0.5, 2.0, 8.0]
    values = []
    for level in levels:
        draws = [
            shattering(
                x,
                x
                + level * torch.randn(x.shape, generator=torch.Generator().manual_seed(s)).double(),
            )
            for s in range(8)
        ]
        values.append(np.mean(draws))
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    assert values[0] < 0.05


def test_ring_metric_sees_the_ring_break():
    x, pos = ring()
    assert neighbour_fraction(x, pos, 24) == 1.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5)).double())
    assert neighbour_fraction(x @ q + 1, pos, 24) == 1.0
    shuffled = x[torch.randperm(24, generator=torch.Generator().manual_seed(0))]
    assert neighbour_fraction(shuffled, pos, 24) < 0.3


def test_shattering_rejects_bad_input():
    with pytest.raises(ValueError, match="coincide"):
        shattering(torch.zeros(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="items"):
        shattering(torch.zeros(4, 2) + torch.arange(4.0)[:, None], torch.zeros(5, 2))


def test_fit_line_r2_matches_a_known_case():
    x = np.arange(10.0)
    fit = fit_line(x, 3 * x - 2)
    assert (fit.slope, fit.intercept, fit.r2) == pytest.approx((3.0, -2.0, 1.0))
    rng = np.random.default_rng(0)
    y = x + rng.normal(0, 2, 10)
    assert fit_line(x, y).r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    y = np.array([2.0, 1, 2, 1, 2, 1, 2, 1, 2, 1])  # known: r^2 = corr^2 by hand
    xm, ym = x - x.mean(), y - y.mean()
    assert fit_line(x, y).r2 == pytest.approx((xm @ ym) ** 2 / ((xm @ xm) * (ym @ ym)))
    assert np.isnan(fit_line([1, 1], [2, 3]).r2)


SMALL = SweepConfig(methods=("rome", "memit"), n_edits=1, distances=(1, 3), sequential_edits=2,
                    n_samples=1000, max_queries=16, efficacy_prompts=4)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    from kgshatter.presets import get_preset
    from kgshatter.training import train

    out = tmp_path_factory.mktemp("sweep") / "run"
    train(get_preset("tiny"), out, progress=False)
    return out


def test_sweep_writes_a_tidy_table_and_resumes_without_duplicates(tiny_run_dir, tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(tiny_run_dir, out, SMALL, progress=False)
    # 2 methods x (corrective <= 1 + 2 distances) single rows + 2 sequence steps each
    rows = (out / "rows.jsonl").read_text().splitlines()
    assert len(rows) == len(result.rows) >= 2 * (2 + 2)
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    single = [r for r in table if r["protocol"] == "single" and r["kind"] == "counterfactual"]
    assert {r["distance"] for r in single} == {"1", "3"}
    for r in single:
        site = result.summary.site  # auto: the clearest ring of the unedited model
        assert site in {"0.mlp_post", "0.resid_post", "1.mlp_post", "1.resid_post"}
        assert 0.0 <= float(r["R.I"]) and r["R.I"] == r[f"R.I@{site}"]
        # where the edit's move lands, per order: somewhere, and nowhere more than the edit
        spill = [float(r[f"spill.{o}"]) for o in ("I", "II", "III")]
        assert all(0.0 <= v < 10 for v in spill) and max(spill) > 0
    summary = json.loads((out / "summary.json").read_text())
    kinds = summary["methods"]["rome"]["by_kind"].values()
    assert all({"spill.I", "spill.II", "spill.III"} <= set(k["mechanism"]) for k in kinds)
    assert set(summary["methods"]) == {"rome", "memit"}
    assert len(summary["methods"]["memit"]["sequential"]) == 2
    # resume: nothing recomputed, nothing duplicated
    again = run_sweep(tiny_run_dir, out, SMALL, progress=False)
    assert (out / "rows.jsonl").read_text().splitlines() == rows
    assert len(again.rows) == len(rows)
    # a crash mid-write leaves a torn last line: it is dropped and its row recomputed
    text = "\n".join(rows[:-1]) + "\n" + rows[-1][: len(rows[-1]) // 2]
    (out / "rows.jsonl").write_text(text)
    run_sweep(tiny_run_dir, out, SMALL, progress=False)
    keys = [(json.loads(r)["method"], json.loads(r)["protocol"], json.loads(r)["kind"],
             json.loads(r)["sweep_distance"], json.loads(r)["index"])
            for r in (out / "rows.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(keys) == len(set(keys)) == len(rows)


def test_sweep_refuses_bad_input_before_work(tiny_run_dir, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="outside the ring"):
        run_sweep(tiny_run_dir, out, SweepConfig(distances=(9,)), progress=False)
    with pytest.raises(ValueError, match="unknown editing method"):
        SweepConfig(methods=("rom",))
    with pytest.raises(ValueError, match="position must be one of"):
        SweepConfig(position="middle")
    with pytest.raises(ValueError, match="model has layers 0..1"):
        run_sweep(tiny_run_dir, out, SweepConfig(site="4.resid_post"), progress=False)
    assert not (out / "rows.jsonl").exists()
    run_sweep(tiny_run_dir, out, SMALL, progress=False)
    other = SweepConfig.from_dict({**SMALL.to_dict(), "distances": (2,)})
    with pytest.raises(
        ValueError, match=r"different sweep setting distances \(\[1, 3\] there, \[2\] now\)"
    ) as e:
        run_sweep(tiny_run_dir, out, other, progress=False)
    assert "methods" not in str(e.value) and "{" not in str(e.value)  # names the field only


def test_a_sweep_edits_the_order_asked_and_lists_it_first(tiny_run_dir, tmp_path):
    """``edit_order=1`` edits order II's facts only, and the summary (hence the targets and
    the figures) treats order II as the edited order; the default pins nothing new, so a
    sweep folder written before the field existed still resumes."""
    from kgshatter.kg.graph import KnowledgeGraph

    graph = KnowledgeGraph.load(tiny_run_dir / "graph.json")
    config = SweepConfig.from_dict({**SMALL.to_dict(), "edit_order": 1, "sequential_edits": 0})
    result = run_sweep(tiny_run_dir, tmp_path / "ii", config, progress=False)
    edited = [r for r in result.rows if r.get("relation") is not None]
    assert edited and {graph.relation(int(r["relation"])).order for r in edited} == {1}
    for m in result.summary.methods.values():
        assert all(k.orders[0] == "II" for k in m.by_kind.values())
    from kgshatter.studies.targets import fidelity_checks

    (spread,) = [c for c in fidelity_checks(result.summary) if "other orders" in c.claim]
    assert "as order II" in spread.claim and "paper (its order I edited) I " in spread.evidence
    pinned = json.loads((tmp_path / "ii" / "sweep.json").read_text())["sweep"]
    assert pinned["edit_order"] == 1
    with pytest.raises(ValueError, match=r"edit_order \(1 there, None now\)"):
        run_sweep(tiny_run_dir, tmp_path / "ii", SMALL, progress=False)
    run_sweep(tiny_run_dir, tmp_path / "i", SMALL, progress=False)
    assert "edit_order" not in json.loads((tmp_path / "i" / "sweep.json").read_text())["sweep"]
    with pytest.raises(ValueError, match=r"edit_order must be in 0..2 \(the graph's 3 orders\)"):
        run_sweep(tiny_run_dir, tmp_path / "iv", SweepConfig(edit_order=3), progress=False)


def test_reproduce_smoke_on_tiny(tmp_path, capsys):
    out = tmp_path / "repro"
    args = ["reproduce", "--preset", "tiny", "--out", str(out), "--quiet", "--n", "1",
            "--methods", "rome,alphaedit", "--sequential", "2", "--samples", "1000",
            "--max-queries", "16"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    # tiny never learns inference: the terminal names the target it misses
    assert "not met: pre-edit accuracy >= 95 / 90 / 60 on every order" in printed
    report = (out / "report.md").read_text()
    assert "## Findings: the fidelity targets" in report and "### rome: " in report
    assert "### alphaedit: " in report and "; paper 0.905)" in report
    for name in ("accuracy_vs_distance", "shattering_vs_distance", "shattering_vs_accuracy",
                 "sequential", "rings_before_after"):  # fmt: skip
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"({name}.png)" in report
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["example"]["rings"]["I"]) == {"before", "after"}
    assert "`rings_before_after.png` draws rome" in report
    # summary.json reads back into the typed results, and writes out the same
    typed = SweepSummary.from_dict(summary)
    assert typed.to_dict() == summary and typed.main_method() == "rome"
    assert typed.methods["rome"].by_distance()[1].n == 1
    assert "rome: " in printed and "fidelity targets met" in printed
    # tiny never learns inference, and the report says so; table.csv's columns are explained
    assert "Caution: this model has not learned" in report
    assert "`acc.SPLIT.ORDER`: the CHANGE in accuracy" in report
    assert "Paper: 2048 entities on 3 cyclic orders, relations up to 4 hops" in report
    # a second invocation reuses everything and the report's times cover both
    assert main(args) == 0
    capsys.readouterr()
    times = json.loads((out / "times.json").read_text())
    assert len(times["invocations"]) == 2
    assert "over all 2 invocations" in (out / "report.md").read_text()
    assert main(["reproduce", "--preset", "tiny", "--out", str(out), "--distances", "99"]) == 2
    assert "outside the ring" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "tiny", "--out", str(out), "--distances", "1..x"]) == 2
    assert "--distances must look like 1..4 or 1,2,3,4" in capsys.readouterr().err


def test_self_attention_variant_hides_the_subject_until_layer_one(tmp_path):
    """cpu-subject's mechanism on a tiny model: layer 0 attends to itself only, so at the relation
    token every entity looks the same there; the sweep records NaN for R at such sites."""
    import dataclasses
    import math

    from kgshatter.presets import get_preset
    from kgshatter.training import load_run, train

    base = get_preset("tiny")
    run = base.replace(model=dataclasses.replace(base.model, layer0_attention="self"))
    train(run, tmp_path / "run", progress=False)
    _, graph, model, _ = load_run(tmp_path / "run")  # the hook comes back with the model
    tokens = torch.randint(0, graph.n_entities, (3, 8))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern, torch.eye(8).expand_as(pattern))
    config = SweepConfig.from_dict({**SMALL.to_dict(), "methods": ("rome",), "sequential_edits": 0,
                                    "kinds": ("counterfactual",), "distances": (1,)})  # fmt: skip
    result = run_sweep(tmp_path / "run", tmp_path / "sweep", config, progress=False)
    row = next(r for r in result.rows if "efficacy" in r)
    assert math.isnan(row["R.I@0.resid_post"]) and math.isnan(row["R.I@0.mlp_post"])
    assert str(result.summary.site).startswith("1.")
    with pytest.raises(ValueError, match="no preset 'subjective'"):
        SweepConfig(editor_preset="subjective")


def test_older_run_records_without_new_model_fields_still_resume(tmp_path):
    from kgshatter.presets import get_preset
    from kgshatter.training import train

    run = get_preset("tiny")
    out = tmp_path / "run"
    train(run, out, progress=False, max_steps=10)
    record = json.loads((out / "run.json").read_text())
    del record["config"]["model"]["layer0_attention"]  # as written before the field existed
    (out / "run.json").write_text(json.dumps(record))
    result = train(run, out, resume=True, progress=False, max_steps=20)
    assert result.history[-1]["step"] == 20


def test_batched_single_edits_give_the_same_table_and_resume_exactly(tiny_run_dir, tmp_path):
    """Single edits computed in groups (shared target optimisation) with the forward-pass
    shortcuts give the table of edits computed one at a time on full passes, to 1e-5; a sweep
    killed inside a group recomputes the whole group, so its rows are the uninterrupted
    sweep's bytes."""
    from kgshatter.bench.editing import without_shortcuts

    config = SweepConfig(methods=("rome", "alphaedit", "pmet"), kinds=("counterfactual",),
                         n_edits=3, distances=(1, 2), sequential_edits=0, n_samples=1000,
                         max_queries=16, efficacy_prompts=4)  # fmt: skip
    with without_shortcuts():
        one = run_sweep(tiny_run_dir, tmp_path / "one", config, progress=False, edit_batch=1)
    grouped = run_sweep(tiny_run_dir, tmp_path / "grouped", config, progress=False, edit_batch=3)
    assert len(one.rows) == len(grouped.rows) == 3 * 2 * 3
    for a, b in zip(one.rows, grouped.rows, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if k == "seconds":
                continue
            if isinstance(v, float) and not math.isnan(v):
                assert b[k] == pytest.approx(v, abs=1e-5), k
            elif not (isinstance(v, float) and math.isnan(v)):
                assert b[k] == v, k
    # kill inside a group: keep the first row of each group only, then resume
    rows = (tmp_path / "grouped" / "rows.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["index"] == 0]
    (tmp_path / "grouped" / "rows.jsonl").write_text("\n".join(kept) + "\n")
    run_sweep(tiny_run_dir, tmp_path / "grouped", config, progress=False, edit_batch=3)
    resumed = (tmp_path / "grouped" / "rows.jsonl").read_text().splitlines()

    def strip(line):
        row = json.loads(line)
        row.pop("seconds")
        return json.dumps(row, sort_keys=True)

    assert sorted(map(strip, resumed)) == sorted(map(strip, rows))
    with pytest.raises(ValueError, match="edit_batch"):
        run_sweep(tiny_run_dir, tmp_path / "x", config, progress=False, edit_batch=0)
