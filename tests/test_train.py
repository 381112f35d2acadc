"""Training: determinism, checkpoints, exact resume, run-directory safety, and learning."""

from __future__ import annotations

import dataclasses
import json
from itertools import pairwise

import pytest
import torch

from kgshatter.evaluate import Evaluator, mean_ablation
from kgshatter.presets import RunConfig, TrainConfig, get_preset
from kgshatter.training import checkpoints, load_run, lr_at, train


def short_run(steps: int = 40) -> RunConfig:
    tiny = get_preset("tiny")
    t = dict(tiny.train.to_dict(), steps=steps, eval_every=20, checkpoint_every=20)
    return tiny.replace(train=TrainConfig.from_dict(t))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_same_seed_gives_identical_weights():
    run = short_run(15)
    a = train(run, None, progress=False)
    b = train(run, None, progress=False)
    assert_same_weights(weights(a.model), weights(b.model))
    other = run.replace(train=TrainConfig.from_dict(dict(run.train.to_dict(), seed=1)))
    c = train(other, None, progress=False)
    wa, wc = weights(a.model), weights(c.model)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_checkpoint_round_trip_and_resume_equivalence(tmp_path):
    run = short_run(40)
    full = train(run, tmp_path / "full", progress=False)
    # interrupt after 20 steps (a checkpoint), then resume to the end
    train(run, tmp_path / "cut", progress=False, max_steps=20)
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step_0000020"]
    resumed = train(run, tmp_path / "cut", resume=True, progress=False)
    assert_same_weights(weights(full.model), weights(resumed.model))
    assert [h["step"] for h in resumed.history] == [20, 40]
    assert resumed.history[-1]["accuracy"] == full.history[-1]["accuracy"]
    # the checkpoint reloads into a fresh model with identical logits
    run2, graph, model, state = load_run(tmp_path / "full")
    assert run2 == run and graph == full.graph and state["step"] == 40
    tokens = torch.randint(0, graph.n_entities, (4, run.model.n_ctx))
    with torch.no_grad():
        assert torch.equal(model(tokens), full.model(tokens))
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    assert [h["step"] for h in history] == [20, 40]


def test_keep_only_newest_checkpoints(tmp_path):
    run = short_run(60)
    train(run, tmp_path / "r", progress=False)
    assert [p.name for p in checkpoints(tmp_path / "r")] == ["step_0000040", "step_0000060"]
    assert not list((tmp_path / "r" / "checkpoints").glob(".tmp-*"))


def test_out_dir_safety(tmp_path):
    run = short_run(20)
    train(run, tmp_path / "r", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds this run.*--resume"):
        train(run, tmp_path / "r", progress=False)
    different = run.replace(train=TrainConfig.from_dict(dict(run.train.to_dict(), lr=1e-3)))
    with pytest.raises(ValueError, match="already holds a different run"):
        train(different, tmp_path / "r", resume=True, progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert before == after, "a refused run must not touch the directory"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a kgshatter run directory"):
        train(run, foreign, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_load_run_rejects_broken_directories(tmp_path):
    run = short_run(20)
    train(run, tmp_path / "r", progress=False)
    with pytest.raises(FileNotFoundError, match="no run directory"):
        load_run(tmp_path / "nothing")
    other = get_preset("tiny").kg.__class__(**dict(run.kg.to_dict(), seed=5))
    from kgshatter.kg import KnowledgeGraph

    KnowledgeGraph.from_config(other).save(tmp_path / "r" / "graph.json")
    with pytest.raises(ValueError, match="different graph"):
        load_run(tmp_path / "r")
    (tmp_path / "r" / "run.json").unlink()
    with pytest.raises(FileNotFoundError, match="run.json"):
        load_run(tmp_path / "r")


def test_lr_schedule_shape():
    run = get_preset("tiny")
    lrs = [lr_at(s, run) for s in range(run.train.steps)]
    peak = lrs.index(max(lrs))
    assert peak == run.train.warmup_steps - 1 or peak == run.train.warmup_steps
    assert all(a >= b - 1e-12 for a, b in pairwise(lrs[peak:]))
    assert lrs[-1] == pytest.approx(run.train.min_lr_ratio * run.train.lr, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr"),
        ({"loss_positions": "some"}, "loss_positions must be one of"),
        ({"beta2": 1.0}, "beta2"),
    ],
)
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_run_config_mismatched_context():
    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match="walks.n_ctx"):
        tiny.replace(model=tiny.model.__class__(**dict(tiny.model.to_dict(), n_ctx=16)))
    assert RunConfig.from_dict(tiny.to_dict()) == tiny


def test_tiny_learns_direct_recall(trained_tiny):
    """Integration: the tiny preset reaches high direct recall in seconds."""
    final = trained_tiny.history[-1]
    assert final["accuracy"]["direct"]["all"] >= 0.95
    assert final["loss"] < trained_tiny.history[0]["loss"]
    for order in ("I", "II", "III"):
        assert final["accuracy"]["direct"][order] >= 0.9


def test_mean_ablation_finds_where_the_answer_is_computed(trained_tiny, tiny_run):
    model, graph = trained_tiny.model, trained_tiny.graph
    evaluator = Evaluator.for_run(tiny_run, graph, max_queries=64)
    result = mean_ablation(model, evaluator.queries["direct"], graph)
    last = model.cfg.n_layers - 1
    assert set(result) == {"clean"} | {
        f"{layer}.{c}@{p}"
        for layer in range(last + 1)
        for c in ("attn_out", "mlp_out")
        for p in ("subject", "relation")
    }
    assert result["clean"] == evaluator.accuracy(model)["direct"]
    # nothing reads the last block's output at the subject token (causal): exactly clean
    for component in ("attn_out", "mlp_out"):
        assert result[f"{last}.{component}@subject"] == result["clean"]
    # the tiny model carries the subject to the relation token with block 0's attention
    assert result["0.attn_out@relation"]["all"] < result["clean"]["all"] - 0.5, result
    assert evaluator.accuracy(model)["direct"] == result["clean"]  # the hooks are gone
    with pytest.raises(ValueError, match="reads direct-recall queries 'x r', got split 'logical'"):
        mean_ablation(model, evaluator.queries["logical"], graph)


def test_non_finite_loss_stops_before_any_checkpoint(tmp_path, monkeypatch):
    import kgshatter.training as train_module

    original = train_module.loss_fn
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(train_module, "loss_fn", poisoned)
    run = short_run(20)
    with pytest.raises(FloatingPointError, match="nothing was saved"):
        train(run, tmp_path / "r", progress=False)
    assert checkpoints(tmp_path / "r") == []


@pytest.mark.parametrize("plain", [False, True])
def test_loss_at_entity_positions_equals_the_all_positions_loss(plain):
    """Logits computed only where the loss is give the same loss and gradients as logits at
    every position, masked afterwards (the loss before the restriction)."""
    from kgshatter.bench.training import PlainDecoder, all_positions_loss
    from kgshatter.kg.graph import KnowledgeGraph
    from kgshatter.kg.walks import WalkSampler
    from kgshatter.models import build_model
    from kgshatter.training import loss_fn

    run = get_preset("tiny")
    graph = KnowledgeGraph.from_config(run.kg)
    batch = WalkSampler(graph, run.walks).batch_for_step(0, 32, 0)
    vocab = graph.n_entities + graph.n_relations
    model = PlainDecoder(run.model, vocab) if plain else build_model(run.model, vocab)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(model, batch, graph.n_entities)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    new, new_grads = loss_and_grads(lambda m, b, n: loss_fn(m, b, n, "entities"))
    old, old_grads = loss_and_grads(all_positions_loss)
    assert torch.allclose(new, old, rtol=0, atol=1e-6)
    for a, b in zip(new_grads, old_grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    if not plain:  # the scoped row hook is gone afterwards
        assert not model.hook_dict["unembed.hook_in"].fwd_hooks


def test_bfloat16_precision_trains_and_is_validated():
    """bfloat16 autocast follows the float32 loss curve closely, keeps float32 weights, and is
    deterministic."""
    run = short_run(40)
    bf16 = run.replace(train=TrainConfig.from_dict(dict(run.train.to_dict(), precision="bfloat16")))
    a, f32 = train(bf16, None, progress=False), train(run, None, progress=False)
    losses = [h["loss"] for h in a.history]
    assert losses[-1] < losses[0]
    assert losses == pytest.approx([h["loss"] for h in f32.history], abs=0.05)
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    assert not torch.equal(a.model.W_E, f32.model.W_E)
    b = train(bf16, None, progress=False)
    assert_same_weights(weights(a.model), weights(b.model))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="float16")


def test_checkpoints_by_time_do_not_change_the_run(tmp_path):
    """A checkpoint whenever the clock says so (here: after every step) leaves the weights of an
    uninterrupted in-memory run, and a run killed between step checkpoints resumes from the
    newest timed one."""
    run = short_run(30)
    timed = train(run, tmp_path / "a", progress=False, checkpoint_seconds=1e-9, max_steps=23)
    steps = [int(p.name.split("_")[1]) for p in checkpoints(tmp_path / "a")]
    assert steps == [22, 23]  # every step was saved; keep_checkpoints prunes to the newest two
    resumed = train(run, tmp_path / "a", resume=True, progress=False, checkpoint_seconds=1e-9)
    plain = train(run, None, progress=False)
    assert_same_weights(weights(resumed.model), weights(plain.model))
    assert [h["step"] for h in timed.history] == [20, 23]  # evaluated where it stopped
    with pytest.raises(ValueError, match="checkpoint_seconds must be > 0"):
        train(run, tmp_path / "b", progress=False, checkpoint_seconds=0.0)


def test_load_run_at_a_kept_step_is_that_steps_model(tmp_path):
    """``load_run(step=S)`` gives the weights the run had at step S (a point of the learning
    curve), the newest by default; a step with no checkpoint is refused naming the kept ones."""
    run = short_run(40)  # checkpoints at 20 and 40, both kept
    train(run, tmp_path / "r", progress=False)
    _, _, at20, state = load_run(tmp_path / "r", step=20)
    assert state["step"] == 20
    assert_same_weights(
        weights(at20), weights(train(run, None, progress=False, max_steps=20).model)
    )
    newest, at40 = load_run(tmp_path / "r")[2], load_run(tmp_path / "r", step=40)[2]
    assert_same_weights(weights(newest), weights(at40))
    with pytest.raises(ValueError, match="no checkpoint at step 30; it has steps 20, 40"):
        load_run(tmp_path / "r", step=30)


def test_crash_windows_resume_cleanly(tmp_path):
    """A kill right after the run record (no graph.json yet), temporaries of killed writers,
    a damaged newest checkpoint and a stray step_abc folder: resume goes on from the newest
    complete checkpoint and leaves no temporaries."""
    import os
    import shutil
    import subprocess

    run = short_run(40)
    out = tmp_path / "r"
    train(run, out, progress=False, max_steps=20)
    (out / "graph.json").unlink()  # as if killed between the run record and the graph
    dead = subprocess.Popen(["true"])
    dead.wait()  # a finished process: its pid is free
    stale_dir = out / "checkpoints" / f".tmp-step_0000030-{dead.pid}"
    stale_dir.mkdir()
    stale_file = out / f".history.json.tmp{dead.pid}"
    stale_file.write_text("{")
    live_file = out / f".other.json.tmp{os.getpid()}"  # a live writer's: kept
    live_file.write_text("{")
    (out / "checkpoints" / "step_abc").mkdir()
    damaged = out / "checkpoints" / "step_0000030"
    shutil.copytree(checkpoints(out)[-1], damaged)
    (damaged / "optimizer.pt").unlink()
    assert [p.name for p in checkpoints(out)] == ["step_0000020"]
    resumed = train(run, out, resume=True, progress=False)
    plain = train(run, None, progress=False)
    assert_same_weights(weights(resumed.model), weights(plain.model))
    assert (out / "graph.json").is_file()
    assert not stale_dir.exists() and not stale_file.exists() and live_file.exists()


def test_warm_start_continues_from_a_run_and_resumes_exactly(tmp_path):
    """--init-from: the source's weights, a fresh optimiser and schedule; self-contained, exact."""
    source = train(short_run(20), tmp_path / "src", progress=False)
    run = short_run(40).replace(
        train=TrainConfig.from_dict(dict(short_run(40).train.to_dict(), lr=1e-3))
    )
    # zero steps of training would leave the source's weights: check the start point itself
    start = train(run, None, progress=False, init_from=tmp_path / "src", max_steps=0)
    assert_same_weights(weights(start.model), weights(source.model))
    full = train(run, tmp_path / "warm", progress=False, init_from=tmp_path / "src")
    record = json.loads((tmp_path / "warm" / "run.json").read_text())
    assert record["init"]["source_step"] == 20 and len(record["init"]["sha256"]) == 64
    assert (tmp_path / "warm" / "init.safetensors").is_file()
    # a differently initialised model: warm and cold differ
    cold = train(run, None, progress=False)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(weights(full.model).values(), weights(cold.model).values(), strict=True)
    )
    # interrupted after its first checkpoint, resumed without --init-from: the same bytes
    train(run, tmp_path / "cut", progress=False, init_from=tmp_path / "src", max_steps=20)
    resumed = train(run, tmp_path / "cut", resume=True, progress=False)
    assert_same_weights(weights(full.model), weights(resumed.model))
    # killed before its first checkpoint: resumes from the copied initial weights
    train(run, tmp_path / "early", progress=False, init_from=tmp_path / "src", max_steps=0)
    early = train(run, tmp_path / "early", resume=True, progress=False)
    assert_same_weights(weights(full.model), weights(early.model))


def test_warm_start_refuses_mismatches(tmp_path):
    train(short_run(20), tmp_path / "src", progress=False)
    run = short_run(20)
    other_graph = run.replace(kg=dataclasses.replace(run.kg, seed=run.kg.seed + 1))
    with pytest.raises(ValueError, match="another graph"):
        train(other_graph, tmp_path / "a", progress=False, init_from=tmp_path / "src")
    wider = run.replace(model=dataclasses.replace(run.model, d_model=2 * run.model.d_model))
    with pytest.raises(ValueError, match="do not fit this model"):
        train(wider, tmp_path / "b", progress=False, init_from=tmp_path / "src")
    with pytest.raises(ValueError, match="no such file or directory"):
        train(run, tmp_path / "c", progress=False, init_from=tmp_path / "missing")
    for name in ("a", "b", "c"):  # nothing written by a refused start
        assert not (tmp_path / name).exists()
    # a run started from scratch is not silently continued from other weights
    train(run, tmp_path / "scratch", progress=False, max_steps=0)
    with pytest.raises(ValueError, match="did not start from"):
        train(run, tmp_path / "scratch", resume=True, progress=False, init_from=tmp_path / "src")


def test_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A prune killed mid-delete leaves a temporary, not a step_ folder without its weights;
    one such folder left by an earlier version is pruned at the next checkpoint."""
    import shutil
    from pathlib import Path

    import kgshatter.training as training

    run = short_run(80)
    out = tmp_path / "r"
    train(run, out, progress=False, max_steps=40)  # checkpoints at 20 and 40 (keep 2)
    half = out / "checkpoints" / "step_0000010"  # an earlier version's half-deleted folder
    half.mkdir()
    (half / "state.json").write_text("{}")

    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-step_0000020"):
            raise KeyboardInterrupt  # the process dies inside the prune's delete
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(training.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):  # killed pruning step_20 after the step-60 save
        train(run, out, resume=True, progress=False, max_steps=60)
    monkeypatch.setattr(training.shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    steps = [n for n in names if n.startswith("step_")]
    for n in steps:  # every step_ folder left is complete (or the old half-deleted one)
        assert n == "step_0000010" or (out / "checkpoints" / n / "model.safetensors").is_file()
    assert any(n.startswith(".tmp-step_") for n in names)
    train(run, out, resume=True, progress=False)
    assert not half.exists()
    assert [p.name for p in checkpoints(out)] == ["step_0000060", "step_0000080"]
