"""`SoftmaxCE.target_entries` is the dense `target_weights` read at single entries."""

import numpy as np
from hypothesis import given, settings, strategies as st

from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), probs=st.booleans(), smoothing=st.sampled_from([0.0, 0.1]),
       form=st.sampled_from(["torch", "others"]), weighted=st.booleans(),
       extended=st.sampled_from(["none", "softcap", "sample_weight", "shard"]))
def test_entries_equal_the_dense_rows(seed, probs, smoothing, form, weighted, extended):
    rng = np.random.default_rng(seed)
    N, C = 7, 9
    z = rng.standard_normal((N, C)) * 3
    if probs:
        y = rng.random((N, C))
        y /= y.sum(axis=1, keepdims=True)
    else:
        y = rng.integers(0, C, N)
        y[1] = -100
    sem = {"none": {}, "softcap": {"softcap": 2.0, "logit_scale": 1.5},
           "sample_weight": {"sample_weight": rng.random(N)},
           "shard": {} if probs else {"vocab_offset": 3}}[extended]
    lse = None
    if "vocab_offset" in sem:
        smoothing, weighted = 0.0, False  # a shard is checked without them
        y = np.where(y >= 0, y + 1, y)  # labels 0..C: some fall outside the shard [3, 3 + C)
        lse = np.log(np.exp(z).sum(axis=1) + 5.0)
    problem, _ = build_softmax_ce(
        z, y, weight=rng.random(C) + 0.5 if weighted else None, label_smoothing=smoothing,
        semantics=Semantics(smoothing_form="torch" if probs else form, **sem), lse=lse)
    rows = rng.integers(0, N, 40)
    cols = rng.integers(0, C, 40)
    dense, _spread = problem.target_weights(rows)
    np.testing.assert_array_equal(problem.target_entries(rows, cols), dense[np.arange(40), cols])
