"""How stable is C, the MLP keys' second moment, when it comes from text SmolLM2 samples itself?

    python docs/smollm2/c_stability.py CACHE_DIR [LAYER]

CACHE_DIR holds the sampled texts (`CACHE_DIR/samples`, as `kgshatter months --cache` writes
them). C is computed at LAYER's MLP keys (default 5, ROME's layer in the smollm2-135m preset)
from two disjoint halves of 16,384 tokens and from all 32,768, and compared: the relative
Frobenius distance between the halves, and, for the twelve months' keys (the subject token in
"The months in order: {},"), the cosine between ROME's update directions C^-1 k under each
half and under the whole. Prints JSON.
"""

from __future__ import annotations

import json
import sys

import torch

import kgshatter as ks
from kgshatter.editing.covariance import second_moment
from kgshatter.pretrained.facts import MONTHS
from kgshatter.pretrained.text import SampledCorpus, encode_prompts
from kgshatter.sites import Site

torch.set_num_threads(1)
cache = sys.argv[1]
layer = int(sys.argv[2]) if len(sys.argv) > 2 else 5
pm = ks.load_pretrained("smollm2-135m")
corpus = SampledCorpus(pm.model, pm.tokenizer, pm.model_id, seed=0, cache_dir=f"{cache}/samples")
windows = corpus.token_windows(pm.tokenizer, 256, 32768)
half = len(windows) // 2
parts = {"A": windows[:half], "B": windows[half:], "all": windows}
C = {k: second_moment(pm.model, layer, w.split(8))[0] for k, w in parts.items()}
prompts = encode_prompts(pm.tokenizer, [("", "The months in order: {},", m) for m in MONTHS])
name = Site(layer, "mlp_post").hook_name
_, run = pm.model.run_with_cache(prompts.tokens, names_filter=lambda n: n == name)
keys = run[name][torch.arange(12), prompts.subject].double()
ridge = 1e-6


def direction(c: torch.Tensor) -> torch.Tensor:
    reg = c + ridge * torch.trace(c) / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype)
    u = torch.linalg.solve(reg, keys.T).T
    return u / u.norm(dim=1, keepdim=True)


u = {k: direction(c) for k, c in C.items()}
cos = lambda a, b: float((u[a] * u[b]).sum(1).mean())  # noqa: E731
eig = torch.linalg.eigvalsh(C["all"])
print(
    json.dumps(
        {
            "layer": layer,
            "tokens": {k: int(w.numel()) for k, w in parts.items()},
            "relative_frobenius_A_vs_B": float((C["A"] - C["B"]).norm() / C["all"].norm()),
            "cosine_update_direction": {
                "A_vs_B": cos("A", "B"),
                "A_vs_all": cos("A", "all"),
                "B_vs_all": cos("B", "all"),
            },
            "condition_number_all": float(eig[-1] / eig[0].clamp_min(1e-30)),
            "d_mlp": int(C["all"].shape[0]),
        },
        indent=1,
    )
)
