"""`check_linear`: fused linear cross-entropy (logits = H W^T + b never materialised whole).

One streaming pass over row blocks (models/linear.py) gives the loss, dL/db, the finite
differences and, unless `exact`, randomised projections of your dL/dW and dL/dH (Freivalds):
with Gaussian R (H x k) and S (H x k),

    GW R  vs  G^T (H R)        GH S  vs  G (W S)

row by row. A row passes a projection when |yours.r - ref.r| <= c * T + rounding, where T bounds
the row's tolerance vector |t|_2 (t_j = rtol |ref_j| + atol + tiny + k eps floor_j, each term
bounded by a sum over the row's products); a correct row (|e_j| <= t_j) fails with probability
<= 2 exp(-c^2 / 2), and a row whose error e has |e|_2 >= L * c * T passes one projection with
probability <= sqrt(2/pi) / L (e.r ~ N(0, |e|^2)), all k with that to the k-th. Failing rows are
then computed exactly and compared entry by entry, to list the worst entries with their index.
`exact` instead computes every entry: dL/dH row block by row block inside the pass, dL/dW in a
second pass (vocabulary blocks outer, the row blocks' logits recomputed).

The modules, each importing only those before it: arrays (settings, your gradients), probes
(projections, finite-difference probes), exact (exact entries), stream (the pass), check.
"""

from ce_cli.verify.linear.arrays import LinearSettings
from ce_cli.verify.linear.check import check_linear

__all__ = ["LinearSettings", "check_linear"]
