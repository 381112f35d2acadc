"""Sampled requests, edit metrics and the single / batch / sequential protocols (tiny model)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kgshatter.editing import CovarianceCache, EditRequest, SyntheticTask, get_method
from kgshatter.editing.protocols import EditScorer, run_protocol, sample_requests
from kgshatter.evaluate import Evaluator

N_SAMPLES = 2000


@pytest.fixture(scope="module")
def env(trained_tiny, tiny_sampler, tmp_path_factory):
    model, graph = trained_tiny.model, trained_tiny.graph
    task = SyntheticTask(tiny_sampler, CovarianceCache(tmp_path_factory.mktemp("cov")))
    evaluator = Evaluator.for_run(trained_tiny.run, graph, max_queries=64)
    return model, graph, task, EditScorer(model, evaluator, n_prompts=6)


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_counterfactual_requests_sit_at_distance_d(tiny_graph, d):
    reqs = sample_requests(tiny_graph, "counterfactual", 12, seed=3, distance=d)
    assert len({(r.subject, r.relation) for r in reqs}) == 12  # distinct facts
    for r in reqs:
        assert tiny_graph.relations[r.relation].order == 0  # the edit sub-graph
        assert tiny_graph.edit_distance(r.relation, r.old_target(tiny_graph), r.target) == d
    again = sample_requests(tiny_graph, "counterfactual", 12, seed=3, distance=d)
    assert again == reqs


def test_bad_sampling_requests_fail_clearly(tiny_graph):
    with pytest.raises(ValueError, match=r"distance must be an integer in \[1, 8\]"):
        sample_requests(tiny_graph, "counterfactual", 3, distance=9)
    with pytest.raises(ValueError, match="kind must be one of"):
        sample_requests(tiny_graph, "counterfeit", 3)
    with pytest.raises(ValueError, match="need the model"):
        sample_requests(tiny_graph, "corrective", 3)
    with pytest.raises(ValueError, match="has only"):
        sample_requests(tiny_graph, "counterfactual", 10_000)


def test_corrective_requests_are_the_models_mistakes(env):
    model, graph, task, _ = env
    reqs = sample_requests(graph, "corrective", 5, seed=0, model=model, sampler=task.sampler)
    for r in reqs:
        assert r.target == r.old_target(graph)  # the graph's answer
        prompts = task.prompts(r, 5, 0)[0].tokens
        with torch.no_grad():
            p = torch.softmax(model(prompts)[:, -1], -1).mean(0)
        # mostly wrong on other contexts too (the sampler used different ones)
        assert p.argmax() != r.target or p[r.target] < 0.9


def test_single_protocol_records_efficacy_and_collateral(env):
    model, graph, task, scorer = env
    reqs = sample_requests(graph, "counterfactual", 3, seed=1, distance=2)
    method = get_method("rome")
    res = run_protocol(
        model, task, method, method.config(n_samples=N_SAMPLES), reqs, "single", scorer
    )
    assert [r.step for r in res.records] == [0, 1, 2]
    for rec in res.records:
        assert rec.protocol == "single" and rec.method == "rome" and rec.scored
        assert rec.requests[0]["distance"] == 2
        assert rec.efficacy == 1.0 and rec.efficacy_detail[0].success == 1.0
        assert set(rec.accuracy_change) == {"direct", "logical", "compositional"}
        assert set(rec.accuracy_change["direct"]) == {"I", "II", "III", "all"}
        # the JSON form: the fields measured, nothing absent
        row = rec.to_dict()
        assert row["efficacy_detail"][0]["success"] == 1.0
        assert "retained" not in row and "skipped" not in row
        assert json.loads(json.dumps(row)) == row
        with pytest.raises(dataclasses.FrozenInstanceError):
            rec.efficacy = 0.0  # type: ignore[misc]
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_batch_and_sequential_protocols(env):
    model, graph, task, scorer = env
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = sample_requests(graph, "counterfactual", 3, seed=2, distance=3)
    memit = get_method("memit")
    batch = run_protocol(
        model, task, memit, memit.config(n_samples=N_SAMPLES), reqs, "batch", scorer
    )
    (rec,) = batch.records
    assert rec.protocol == "batch" and len(rec.requests) == 3
    assert max(d.rank for d in batch.edits[0].deltas) <= 3
    assert rec.efficacy is not None and rec.efficacy >= 2 / 3
    alpha = get_method("alphaedit")
    seq = run_protocol(
        model, task, alpha, alpha.config(n_samples=N_SAMPLES), reqs, "sequential", scorer
    )
    assert [r.n_edits_applied for r in seq.records] == [1, 2, 3]
    assert all(r.retained is not None for r in seq.records)
    assert [r.edits_before for r in seq.records] == [0, 1, 2]
    with pytest.raises(ValueError, match="one fact at a time"):
        rome = get_method("rome")
        run_protocol(model, task, rome, rome.config(), reqs, "batch", scorer)
    with pytest.raises(ValueError, match="protocol must be one of"):
        run_protocol(model, task, memit, memit.config(), reqs, "parallel", scorer)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_already_answered_requests_are_recorded_as_skipped(env):
    model, graph, task, scorer = env
    x, rel = 2, graph.relation("I_C1").index
    same = EditRequest(x, rel, graph.apply(rel, x))
    rome = get_method("rome")
    res = run_protocol(
        model, task, rome, rome.config(n_samples=N_SAMPLES), [same], "single", scorer
    )
    (rec,) = res.records
    assert not rec.scored and "already answers" in rec.skipped and not res.edits
    assert set(rec.to_dict()) == {"protocol", "method", "config", "step", "requests", "seconds",
                                  "skipped"}  # fmt: skip
    assert res.scored() == []


def test_neighbourhood_is_the_facts_sharing_the_subject_or_the_relation(env):
    """CounterFact's neighbourhood, synthetic: measured against the unedited model's answers,
    prepared before any edit; no edit, no change; a destructive delta lowers it."""
    from kgshatter.hooks import edited

    from kgshatter.editing import Edit, LayerDelta

    model, graph, task, scorer = env
    request = sample_requests(graph, "counterfactual", 1, seed=3, distance=2)[0]
    fresh = EditScorer(model, scorer.evaluator, n_prompts=4, max_neighbours=1000)
    same_subject, same_relation = fresh.neighbour_facts(request)
    assert {x for x, _ in same_subject} == {request.subject}
    assert request.relation not in {r for _, r in same_subject}
    assert len(same_subject) == graph.n_relations - 1
    assert {r for _, r in same_relation} == {request.relation}
    assert len(same_relation) == graph.n_entities - 1
    capped = EditScorer(model, scorer.evaluator, max_neighbours=5).neighbour_facts(request)
    assert [len(f) for f in capped] == [5, 5]
    assert set(capped[1]) <= set(same_relation)
    with pytest.raises(ValueError, match="prepare_neighbourhood"):
        fresh.neighbourhood(model, [request])
    fresh.prepare_neighbourhood(model, [request])
    unedited = fresh.neighbourhood(model, [request])
    assert unedited["subject_change"] == 0 and unedited["relation_change"] == 0
    assert 0 <= unedited["subject"] <= 1 and 0 <= unedited["relation"] <= 1
    d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
    noise = torch.Generator().manual_seed(0)
    wreck = Edit("noise", [LayerDelta(0, torch.randn(d_mlp, d_model, generator=noise) * 5, None)],
                 [], {}, "test")  # fmt: skip
    with edited(model, wreck):
        broken = fresh.neighbourhood(model, [request])
    assert broken["relation_change"] < 0
    # run_protocol records it on every scored edit
    rome = get_method("rome")
    result = run_protocol(model, task, rome, rome.config("synthetic", n_samples=2000), [request],
                          "single", fresh)  # fmt: skip
    assert set(result.records[0].neighbourhood or {}) == {
        "subject",
        "relation",
        "subject_change",
        "relation_change",
    }
