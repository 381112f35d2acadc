"""Reference mode: ROME's, MEMIT's, PMET's and FT-L's updates recomputed from their papers.

Each test writes the reference algorithm out in plain PyTorch (Meng et al. 2022, "Locating and
Editing Factual Associations in GPT", section 3 and appendix; Gupta et al. 2024, r-ROME;
Meng et al. 2023, MEMIT, algorithm 1) on the tiny model, with the same prompts and the same C,
and checks kgshatter's ``reference=True`` update equals it. The loop below is the papers':
a free vector added at the lookup position of every prompt, loss = mean NLL of the target over
the rewriting prompts + KL on the essence prompt read at its lookup position + weight decay
||delta|| / ||h0||^2 with h0 the bare prompt's activation, stop when the total loss < 0.05,
``steps`` passes of which the last only evaluates, clamp ||delta|| <= c ||h0|| after each update.
PMET (Li et al. 2024, "PMET: Precise Model Editing in a Transformer") optimises an attention and
an MLP delta together with the same loop plus its NLL schedule; FT-L (Zhu et al. 2020, as ROME's
baseline) is constrained fine-tuning of one matrix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kgshatter.hooks import edited, low_rank_delta

from kgshatter.editing import (
    EditRequest,
    FTConfig,
    MEMITConfig,
    PMETConfig,
    ROMEConfig,
    SyntheticTask,
    compute_ft,
    compute_memit,
    compute_pmet,
    compute_rome,
)

N_SAMPLES = 2000


@pytest.fixture(scope="module")
def setup(trained_tiny, tiny_sampler):
    model, graph = trained_tiny.model, trained_tiny.graph
    x, rel = 5, graph.relation("I_C1").index
    old = graph.apply(rel, x)
    new = int(graph.rings[0][(graph.positions[0][old] + 3) % graph.n_entities])
    return model, graph, SyntheticTask(tiny_sampler, cache=None), EditRequest(x, rel, new)


def reference_delta(model, hook, prompts, essence, target, config):
    """The papers' target optimisation, written out (module doc); returns (delta, h0)."""
    pad = prompts.tokens.shape[1] - essence.tokens.shape[1]  # right-pad the short essence row
    row = torch.cat([essence.tokens, essence.tokens[:, -1:].expand(-1, pad)], 1)
    batch = torch.cat([prompts.tokens, row], 0)
    n = len(prompts)
    lookup = torch.cat([prompts.index(config.position), essence.index(config.position)])
    answer_at = prompts.last
    rows = torch.arange(len(batch))
    seen = {}

    def grab(act, hook):
        seen["h"] = act[rows, lookup].detach().clone()

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(hook, grab)])
    h0 = seen["h"][0]  # the bare prompt's activation
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)

    def add(act, hook):
        out = act.clone()
        out[rows, lookup] = out[rows, lookup] + delta
        return out

    init_kl = None
    for it in range(config.steps):
        opt.zero_grad()
        logits = model.run_with_hooks(batch, fwd_hooks=[(hook, add)])
        kl_logp = torch.log_softmax(logits[rows[n:], lookup[n:]], -1)
        if init_kl is None:
            init_kl = kl_logp.detach().clone()
        logp = torch.log_softmax(logits[rows[:n], answer_at], -1)
        nll = -logp[:, target].mean()
        kl = config.kl_factor * F.kl_div(init_kl, kl_logp, log_target=True, reduction="batchmean")
        decay = config.weight_decay * delta.norm() / h0.norm() ** 2
        loss = nll + kl + decay
        if loss < 5e-2 or it == config.steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            limit = config.clamp_norm_factor * h0.norm()
            if delta.norm() > limit:
                delta[...] = delta * limit / delta.norm()
    return delta.detach().double(), h0.double()


def mean_at(model, hook, prompts, position, fwd_hooks=()):
    seen = {}

    def grab(act, hook):
        seen["a"] = act[torch.arange(len(prompts)), prompts.index(position)].detach()

    with torch.no_grad():
        model.run_with_hooks(prompts.tokens, fwd_hooks=[*fwd_hooks, (hook, grab)])
    return seen["a"].double().mean(0)


def ridge_c(task, model, layer, config):
    stats = task.stats(model, layer, config.n_samples, config.seed, "tiny")
    c = stats.matrix
    return c + config.ridge * stats.eigenvalues.mean() * torch.eye(c.shape[0], dtype=c.dtype)


def check_spread(model, task, config, edit, prompts, z, z_hook, spread):
    """MEMIT's algorithm 1 (and PMET's, spread by a square root) layer by layer: keys the mean
    of the bare and the prefixed prompts' means, the residual z minus the current value at the
    bare prompt with the lower layers' updates applied, divided by ``spread(layers left)``,
    solved against lambda C + k k^T; each layer's delta must equal kgshatter's."""
    pos, bare, prefixed = config.position, prompts.rows(0, 1), prompts.rows(1)
    applied = []
    for i, layer in enumerate(config.layers):
        hooks = [pair for d in applied for pair in d]
        key_hook = f"blocks.{layer}.mlp.hook_post"
        k = 0.5 * (mean_at(model, key_hook, bare, pos, hooks)
                   + mean_at(model, key_hook, prefixed, pos, hooks))  # fmt: skip
        residual = (z - mean_at(model, z_hook, bare, pos, hooks)) / spread(len(config.layers) - i)
        lhs = config.mom2_weight * ridge_c(task, model, layer, config) + torch.outer(k, k)
        expected = torch.outer(torch.linalg.solve(lhs, k), residual)  # [d_mlp, d_model]
        got = edit.deltas[i].dense.double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        applied.append(low_rank_delta(key_hook, f"blocks.{layer}.hook_mlp_out", got.float(), None))


@pytest.mark.parametrize("denominator", ["rrome", "original"])
def test_rome_reference_update_is_the_papers(setup, denominator):
    model, _, task, req = setup
    config = ROMEConfig(reference=True, n_prompts=4, steps=8, n_samples=N_SAMPLES,
                        denominator=denominator, kl_factor=0.5)  # fmt: skip
    edit = compute_rome(model, task, req, config, model_id="tiny")
    prompts, essence = task.reference_prompts(req, config.n_prompts, config.seed)
    assert (
        len(prompts) == 4
        and len(essence) == 1
        and prompts.tokens[0, 2:].eq(prompts.tokens[0, 1]).all()
    )  # the bare prompt first (right-padded), one bare essence prompt
    key_hook, out_hook = "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"
    delta, h0 = reference_delta(model, out_hook, prompts, essence, req.target, config)
    k_star = mean_at(model, key_hook, prompts, config.position)
    u = torch.linalg.solve(ridge_c(task, model, 0, config), k_star)
    if denominator == "rrome":  # r-ROME: k* below, v* = out(bare) + delta minus the mean output
        k, numerator = k_star, h0 + delta - mean_at(model, out_hook, prompts, config.position)
    else:  # ROME: the bare prompt's key below, and v* - W k0 = delta
        k, numerator = mean_at(model, key_hook, prompts.rows(0, 1), config.position), delta
    expected = torch.outer(u, numerator) / (u @ k)
    torch.testing.assert_close(edit.deltas[0].dense.double(), expected, rtol=1e-4, atol=1e-6)
    assert len(edit.info["losses"]) <= config.steps  # 8 passes at most, 7 updates


def test_memit_reference_update_is_the_papers(setup):
    model, _, task, req = setup
    config = MEMITConfig(reference=True, n_prompts=4, steps=8, n_samples=N_SAMPLES,
                         layers=(0, 1), mom2_weight=2.0, kl_factor=0.5)  # fmt: skip
    edit = compute_memit(model, task, req, config, model_id="tiny")
    prompts, essence = task.reference_prompts(req, config.n_prompts, config.seed)
    z_hook = "blocks.1.hook_resid_post"
    delta, h0 = reference_delta(model, z_hook, prompts, essence, req.target, config)
    z = h0 + delta
    check_spread(model, task, config, edit, prompts, z, z_hook, spread=lambda left: left)
    rows = torch.arange(len(prompts))
    with torch.no_grad():  # and it moves the answer towards the target
        before = torch.log_softmax(model(prompts.tokens)[rows, prompts.last], -1)[:, req.target]
        with edited(model, edit):
            after = torch.log_softmax(model(prompts.tokens)[rows, prompts.last], -1)[:, req.target]
    assert (after > before).all()


def test_reference_mode_is_validated_and_used_by_the_reference_presets():
    from kgshatter.editing import get_method

    with pytest.raises(ValueError, match="no relative mode"):
        ROMEConfig(reference=True, relative=True)
    assert get_method("rome").config("gpt2-xl").reference
    assert get_method("memit").config("llama3-8b").reference
    assert get_method("alphaedit").config("gpt2-xl").reference
    assert get_method("pmet").config("gpt2-xl").reference
    assert get_method("ft").config("gpt2-xl").reference
    assert not get_method("rome").config("synthetic").reference
    assert not get_method("ft").config("synthetic").reference


def reference_pmet_deltas(model, hooks, prompts, essence, target, config):
    """PMET's joint optimisation written out: one delta per hook (attention output, MLP
    output) added at the lookup position, the decay and clamp of each relative to its own
    bare-prompt activation, and the NLL weight dropping to 0.1 while the target is the argmax
    at every rewriting prompt (stopping there when the KL term is at most 0.01). Returns the
    deltas, the bare activations and whether the softened weight was ever used."""
    pad = prompts.tokens.shape[1] - essence.tokens.shape[1]
    row = torch.cat([essence.tokens, essence.tokens[:, -1:].expand(-1, pad)], 1)
    batch = torch.cat([prompts.tokens, row], 0)
    n = len(prompts)
    lookup = torch.cat([prompts.index(config.position), essence.index(config.position)])
    rows = torch.arange(len(batch))
    seen = {}

    def grab(name):
        def f(act, hook):
            seen[name] = act[rows, lookup].detach().clone()

        return f

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(h, grab(h)) for h in hooks])
    h0 = [seen[h][0] for h in hooks]
    deltas = [torch.zeros_like(h, requires_grad=True) for h in h0]
    opt = torch.optim.Adam(deltas, lr=config.lr)

    def adder(d):
        def add(act, hook):
            out = act.clone()
            out[rows, lookup] = out[rows, lookup] + d
            return out

        return add

    init_kl, factor, softened = None, 1.0, False
    for it in range(config.steps):
        opt.zero_grad()
        added = [(h, adder(d)) for h, d in zip(hooks, deltas, strict=True)]
        logits = model.run_with_hooks(batch, fwd_hooks=added)
        kl_logp = torch.log_softmax(logits[rows[n:], lookup[n:]], -1)
        if init_kl is None:
            init_kl = kl_logp.detach().clone()
        logp = torch.log_softmax(logits[rows[:n], prompts.last], -1)
        nll = factor * -logp[:, target].mean()
        softened |= factor != 1.0
        kl = config.kl_factor * F.kl_div(init_kl, kl_logp, log_target=True, reduction="batchmean")
        decay = config.weight_decay * sum(
            d.norm() / h.norm() ** 2 for d, h in zip(deltas, h0, strict=True)
        )
        loss = nll + kl + decay
        if loss < 5e-2:
            break
        if bool((logp.argmax(-1) == target).all()):  # max prob == target prob on every prompt
            factor = 0.1
            if kl <= 0.01:
                break
        else:
            factor = 1.0
        if it == config.steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            for d, h in zip(deltas, h0, strict=True):
                limit = config.clamp_norm_factor * h.norm()
                if d.norm() > limit:
                    d[...] = d * limit / d.norm()
    return [d.detach().double() for d in deltas], [h.double() for h in h0], softened


def test_pmet_reference_update_is_the_papers(setup):
    model, _, task, req = setup
    config = PMETConfig(reference=True, n_prompts=4, steps=12, n_samples=N_SAMPLES,
                        layers=(0, 1), mom2_weight=2.0, kl_factor=0.5)  # fmt: skip
    edit = compute_pmet(model, task, req, config, model_id="tiny")
    prompts, essence = task.reference_prompts(req, config.n_prompts, config.seed)
    attn, mlp = "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"
    (_, d_mlp), (_, h_mlp), softened = reference_pmet_deltas(
        model, [attn, mlp], prompts, essence, req.target, config
    )
    assert softened  # the target became the argmax: the schedule was exercised
    z = h_mlp + d_mlp  # only the MLP target drives the update
    check_spread(model, task, config, edit, prompts, z, mlp, spread=lambda left: left**0.5)


def test_ft_reference_update_is_the_baselines(setup, tiny_sampler):
    """Constrained fine-tuning as ROME's FT-L baseline runs it: Adam on W_out's change, the
    requests in chunks (one step per chunk, none when its loss is below 0.01), every element
    kept within +-eps after each chunk, stop when a pass's mean loss is below 0.01."""
    model, graph, task, req = setup
    other = EditRequest(7, req.relation, int(graph.apply(req.relation, 9)))
    requests = [req, other]
    config = FTConfig(reference=True, n_prompts=2, steps=6, lr=5e-3, norm_constraint=2e-3,
                      batch_size=1)  # fmt: skip
    edit = compute_ft(model, task, requests, config, model_id="tiny")
    w = model.blocks[0].mlp.W_out
    delta = torch.zeros(w.shape, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)

    def add(act, hook):
        return act + seen["post"] @ delta

    def keep(act, hook):
        seen["post"] = act

    seen = {}
    hooks = [("blocks.0.mlp.hook_post", keep), ("blocks.0.hook_mlp_out", add)]
    work = [(task.reference_prompts(r, config.n_prompts, config.seed)[0], r.target)
            for r in requests]  # fmt: skip
    for _ in range(config.steps):
        total = count = 0
        for prompts, target in work:  # batch_size 1: one request per chunk
            logits = model.run_with_hooks(prompts.tokens, fwd_hooks=hooks)
            logp = torch.log_softmax(logits[torch.arange(len(prompts)), prompts.last], -1)
            loss = -logp[:, target].mean()
            total, count = total + loss.item() * len(prompts), count + len(prompts)
            opt.zero_grad()
            if loss.item() >= 1e-2:
                loss.backward()
                opt.step()
            with torch.no_grad():
                delta.clamp_(-config.norm_constraint, config.norm_constraint)
        if total / count < 1e-2:
            break
    torch.testing.assert_close(edit.deltas[0].dense, delta.detach(), rtol=1e-4, atol=1e-7)
    assert edit.deltas[0].dense.abs().max() <= config.norm_constraint
    assert len(edit.info["losses"]) >= 2  # one loss per chunk
