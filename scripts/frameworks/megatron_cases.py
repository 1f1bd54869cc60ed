"""Megatron-Core's real vocabulary-parallel cross-entropy on CPU (torch.distributed, gloo), for
ce-check's vocabulary shards (runs with torch and megatron-core on PYTHONPATH, e.g.
`pip install --no-deps --ignore-requires-python --target DIR megatron-core==0.19.2`: 0.19.2
declares Python >= 3.12, and its cp311 wheel runs on 3.11 with torch 2.13; `--check` needs
numpy and ce_cli only).

    python megatron_cases.py OUTDIR [--small] [--only SUBSTR] [--tp 2,4] [--fixtures]
    python megatron_cases.py OUTDIR --check [--only SUBSTR]

Each tensor-parallel size p runs p processes (torch.multiprocessing, gloo backend), each with
megatron's `parallel_state.initialize_model_parallel(tensor_model_parallel_size=p)`; rank r
holds the columns [r V/p, (r + 1) V/p) of (S, B, V) logits, Megatron's layout, and calls
`tensor_parallel.vocab_parallel_cross_entropy(shard, target, label_smoothing)` (reduction none:
one loss per token), then backward of an upstream vector g over the tokens (Megatron's loss
mask: g = 0 on the targets -100, and ~20% more zeros). Nothing of megatron is stubbed: the
module's all-reduces run over gloo (the SHARP barriers and `torch.cuda.synchronize` of
parallel_state are on paths CPU runs never take).

Variants (the case name's last part):

- `plain`: label_smoothing 0. Megatron's per-rank gradient is exp(z - lse_global) - 1{label in
  the rank's columns}, times g; the loss lse - z_y, the same on every rank; a target -100
  (never the first or last token) is masked on every rank, giving loss lse - max and gradient
  g·softmax (g = 0 there under the loss mask).
- `smooth`: label_smoothing 0.1, megatron-core as released: s = eps K/(K - 1) and the mean of
  log p with K and the mean LOCAL to the rank's V/p columns (NVIDIA/Megatron-LM#7464, #737), so
  every rank's loss differs and each rank's gradient is p - (1 - s) 1{label} - s/K.
- `smoothfix`: label_smoothing 0.1 with the same building blocks
  (`VocabParallelCrossEntropy`'s forward helpers) but the GLOBAL K = V and the global mean of
  log p (one more all-reduce: the shards' sums of z - max; Σ log p = Σ (z - max) - V log S,
  which never takes log 0): what the open fix PR #7466 describes. Written here, not released.
- `fused`: `fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy` (label smoothing
  0; its helpers compiled by torch.compile as megatron's `jit_fuser` is), whose backward
  casts the gradient to bfloat16 before autograd casts it back to the logits' dtype.

Planted bugs (`grad_bug_<name>`, every rank's shard concatenated), the real function run with
one thing changed:

- `wrongrank`: every target moved by +V/p (mod V): rank r applies rank r - 1's vocabulary
  range, so each label term lands on the wrong rank;
- `nomaxreduce` / `nosumreduce` (`plain`): the all-reduce of the max, or of the sum of
  exponentials, left out (a lost collective): each rank's own max, or its own normaliser;
- `lastsmooth` (`plain`): the last rank called with label_smoothing 0.1, the others with 0;
- `lastnosmooth` (`smoothfix`): the last rank with label_smoothing 0.

dtypes f32 and bf16 (Megatron upcasts to float32: `.float()`; autograd casts the float32
gradient back to bf16, one rounding); TP 2 and 4; V 1000 and 32,000 (full: also 128,256);
logit std 1, 10, 30; at most 2^17 logits per case (--small: 2^14), at least 8 tokens.

Each OUTDIR/<name>.npz holds `labels` (S, B), `sample_weight` g (S, B), per rank r
`logits_r<r>`, `grad_r<r>` (S, B, V/p; bf16 widened exactly to float32) and `loss_r<r>` (S, B),
the planted bugs' `grad_bug_<name>` (S, B, V), and, unless --fixtures, the full-vocabulary
`logits` and `grad` (the shards concatenated: `load` rebuilds them when absent), with `meta`
(JSON, also OUTDIR/<name>.json without --fixtures).

`--check` runs ce-check (ce_cli importable) on every case in OUTDIR, on both kernels (the
default compiled one and CE_CHECK_FUSED=0): the merged check of the p shards
(`grad --shards vocab`, in process) and the full-vocabulary check of the concatenated arrays,
reduction sum with the sample weights g and your loss Σ g_n L_n (rank 0's), the per-token
losses (reduction none), and each rank alone in the one-shard form (`--vocab-offset r V/p
--vocab-size V --lse GLOBAL`, the lse from the concatenated logits); the planted bugs, and `smooth` with the global semantics
(`--label-smoothing 0.1 --smoothing-form others`) and the local one (each rank on its own,
`check_local`: its columns as the whole vocabulary, labels made local). bf16 gradients are
checked as computed in float32 and stored in bf16 (`--precision f32` on a bf16 file), and
`fused` gradients likewise (stored in bf16 by the cast, whatever the logits' dtype).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

EPS_LS = 0.1
SCALES = (1.0, 10.0, 30.0)
TPS = (2, 4)
VARIANTS = {"plain": 0.0, "smooth": EPS_LS, "smoothfix": EPS_LS, "fused": 0.0}
BUGS = {"plain": ("wrongrank", "nomaxreduce", "nosumreduce", "lastsmooth"),
        "smoothfix": ("wrongrank", "lastnosmooth"), "fused": ("wrongrank",), "smooth": ()}


def cases(small: bool, tps=TPS) -> list[dict]:
    out = []
    for big in (False, True):
        for v in VARIANTS:
            for p in tps:
                for dt in ("f32", "bf16"):
                    for C in ((128_256,) if big else (1000, 32_000)):
                        for s in SCALES:
                            out.append(dict(framework="megatron", call_tag=f"tp{p}", dtype=dt,
                                            layout="sbv", C=C, scale=s, reduction="none",
                                            variant=v, target="index", tp=p))
        if small:
            break
    return out


def fixture_keep(c: dict) -> bool:
    """The committed subset (with --small, about 2.3 MB): V 1000, every variant, float32 at TP 2
    std 30 and TP 4 std 1, bf16 at TP 2 std 1 and TP 4 std 30."""
    return c["C"] == 1000 and (c["dtype"], c["tp"], c["scale"]) in (
        ("f32", 2, 30.0), ("f32", 4, 1.0), ("bf16", 2, 1.0), ("bf16", 4, 30.0))


def tokens(C: int, small: bool) -> tuple[int, int]:
    """(S, B): B = 2 sequences, at least 8 tokens, at most 2^17 (--small 2^14) logits."""
    n = max(8, min(256, (1 << (14 if small else 17)) // C))
    return n // 2, 2


def draw(C: int, small: bool, scale: float, seed: int):
    """float64 logits (S, B, V) of std `scale`, labels (S, B) with ~10% -100 (never the first or
    last token), and the upstream vector g in [0, 2) with ~20% zeros, zero at the -100."""
    rng = np.random.default_rng(seed)
    S, B = tokens(C, small)
    z = rng.standard_normal((S, B, C)) * scale
    y = rng.integers(0, C, size=(S, B), dtype=np.int64)
    mask = rng.random((S, B)) < 0.10
    mask.flat[0] = mask.flat[-1] = False
    y[mask] = -100
    g = rng.uniform(0.0, 2.0, size=(S, B))
    g[rng.random((S, B)) < 0.2] = 0.0
    g.flat[0] = 1.5
    g[mask] = 0.0
    return z, y, g


# ---- the generator (torch + megatron-core) ----

def fixed_function(torch, VPCE, get_group):
    """Megatron's vocab-parallel CE from its own helpers, label smoothing over the GLOBAL
    vocabulary (K = V, the mean of log p over all V): Σ_c log p_c = Σ_c (z_c - m) - V log S."""
    dist = torch.distributed

    class Fixed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, label_smoothing):
            group = get_group()
            logits, logits_max = VPCE.calculate_logits_max(logits)
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            part, rank, world = logits.size(-1), group.rank(), group.size()
            start = rank * part
            shifted_sum = (logits - logits_max.unsqueeze(-1)).sum(dim=-1)
            mask, mt1d, pred, sum_exp, exp = VPCE.calculate_predicted_logits(
                logits, target, logits_max, start, start + part)
            dist.all_reduce(pred, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(shifted_sum, op=dist.ReduceOp.SUM, group=group)
            softmax, loss = VPCE.calculate_cross_entropy_loss(exp, pred, sum_exp)
            V = part * world
            if label_smoothing > 0:
                s = label_smoothing * V / (V - 1)
                mean_log_probs = shifted_sum / V - torch.log(sum_exp)
                loss = (1.0 - s) * loss - s * mean_log_probs
            ctx.label_smoothing, ctx.V = label_smoothing, V
            ctx.save_for_backward(softmax, mask, mt1d)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            softmax, mask, mt1d = ctx.saved_tensors
            grad_2d, arange_1d, update, grad_input = VPCE.prepare_gradient_calculation_operands(
                softmax, mask)
            if ctx.label_smoothing > 0:
                s = ctx.label_smoothing * ctx.V / (ctx.V - 1)
                grad_2d[arange_1d, mt1d] -= (1.0 - s) * update
                grad_2d[arange_1d, :] -= s / ctx.V
                grad_input.mul_(grad_output.unsqueeze(dim=-1))
            else:
                grad_input = VPCE.calculate_gradients(grad_2d, arange_1d, mt1d, update, grad_input,
                                                      grad_output)
            return grad_input, None, None

    return Fixed


class DropReduce:
    """torch.distributed.all_reduce with the `which`-th call of `op` left out (a lost
    collective), every rank alike."""

    def __init__(self, dist, op, which: int):
        self.dist, self.op, self.which, self.seen = dist, op, which, 0
        self.orig = dist.all_reduce

    def __enter__(self):
        def all_reduce(t, op=self.dist.ReduceOp.SUM, group=None, async_op=False):
            if op == self.op:
                self.seen += 1
                if self.seen == self.which:
                    return None
            return self.orig(t, op=op, group=group, async_op=async_op)
        self.dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce = self.orig


def rank_run(torch, fns, case: dict, x_shard, y, g, bug: str = ""):
    """(loss, grad) of this rank's call of the real function on a copy of its shard."""
    dist = torch.distributed
    rank, p, V = dist.get_rank(), case["tp"], case["C"]
    v, eps = case["variant"], VARIANTS[case["variant"]]
    if bug == "wrongrank":
        y = torch.where(y >= 0, (y + V // p) % V, y)
    if bug == "lastsmooth" and rank == p - 1:
        eps = EPS_LS
    if bug == "lastnosmooth" and rank == p - 1:
        eps = 0.0
    leaf = x_shard.clone().requires_grad_(True)
    inp = leaf.clone()  # megatron works in place on its input (as on the LM head's output)
    if v == "fused":
        loss = fns["fused"](inp, y, fns["group"]())
    elif v == "smoothfix":
        loss = fns["fixed"].apply(inp, y, eps)
    elif bug in ("nomaxreduce", "nosumreduce"):
        op = dist.ReduceOp.MAX if bug == "nomaxreduce" else dist.ReduceOp.SUM
        with DropReduce(dist, op, 1 if bug == "nomaxreduce" else 2):
            loss = fns["vpce"](inp, y, eps)
    else:
        loss = fns["vpce"](inp, y, eps)
    loss.backward(g)
    return loss.detach(), leaf.grad


def to_np(t) -> np.ndarray:
    t = t.detach()
    if t.dtype == t.float().dtype or t.dtype.itemsize != 2:
        return t.numpy().copy()
    return t.float().numpy().copy()


def worker(rank: int, p: int, todo: list, outdir: str, small: bool, fixtures: bool, port: int):
    import torch  # type: ignore[import-not-found]
    import torch.distributed as dist  # type: ignore[import-not-found]

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=p)
    torch.set_num_threads(1)
    from megatron.core import package_info, parallel_state  # type: ignore[import-not-found]
    from megatron.core.fusions import fused_cross_entropy  # type: ignore[import-not-found]
    from megatron.core.tensor_parallel import cross_entropy as mce  # type: ignore[import-not-found]

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=p)
    fns = {"vpce": mce.vocab_parallel_cross_entropy,
           "fused": fused_cross_entropy.fused_vocab_parallel_cross_entropy,
           "group": parallel_state.get_tensor_model_parallel_group,
           "fixed": fixed_function(torch, mce.VocabParallelCrossEntropy,
                                   parallel_state.get_tensor_model_parallel_group)}
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}
    for case, seed in todo:
        V = case["C"]
        z64, y64, g64 = draw(V, small, case["scale"], seed)
        part = V // p
        x = torch.from_numpy(z64).to(tdt[case["dtype"]])[..., rank * part:(rank + 1) * part]
        x = x.contiguous()
        y = torch.from_numpy(y64)
        g = torch.from_numpy(g64).float()
        loss, grad = rank_run(torch, fns, case, x, y, g)
        mine = {f"logits_r{rank}": to_np(x), f"grad_r{rank}": to_np(grad),
                f"loss_r{rank}": to_np(loss), "grad_dtype": str(grad.dtype)}
        for bug in BUGS[case["variant"]] if case["dtype"] == "f32" else ():
            mine[f"bug_{bug}_r{rank}"] = to_np(rank_run(torch, fns, case, x, y, g, bug)[1])
        got: list | None = [None] * p if rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        if got is not None:
            write(outdir, case, seed, got, y64, g64, fixtures, package_info.__version__)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def write(outdir: str, case: dict, seed: int, got: list, y64, g64, fixtures: bool, version: str):
    arrays: dict = {"labels": y64, "sample_weight": g64.astype(np.float32).astype(np.float64)}
    grad_dtype = got[0].pop("grad_dtype")
    for d in got:
        d.pop("grad_dtype", None)
        arrays.update({k: v for k, v in d.items() if not k.startswith("bug_")})
    p = case["tp"]
    for bug in BUGS[case["variant"]]:
        if f"bug_{bug}_r0" in got[0]:
            arrays["grad_bug_" + bug] = np.concatenate([got[r][f"bug_{bug}_r{r}"] for r in range(p)], -1)
    if not fixtures:
        arrays["logits"] = np.concatenate([arrays[f"logits_r{r}"] for r in range(p)], -1)
        arrays["grad"] = np.concatenate([arrays[f"grad_r{r}"] for r in range(p)], -1)
    name = common.case_name(case)
    meta = dict(case, seed=seed, megatron_core=version, grad_dtype=grad_dtype, shape=list(
        arrays["logits_r0"].shape[:-1]) + [case["C"]], label_smoothing=VARIANTS[case["variant"]],
        function=("fused_vocab_parallel_cross_entropy" if case["variant"] == "fused" else
                  "vocab_parallel_cross_entropy" if case["variant"] != "smoothfix" else
                  "VocabParallelCrossEntropy helpers, global smoothing (the #7464 fix)"))
    np.savez_compressed(os.path.join(outdir, name + ".npz"), meta=np.array([json.dumps(meta)]),
                        **arrays)
    if not fixtures:
        with open(os.path.join(outdir, name + ".json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
    print("wrote", name, flush=True)


def generate(args, tps, fixtures: bool) -> None:
    import torch.multiprocessing as mp  # type: ignore[import-not-found]

    all_cases = cases(args.small, tps)
    draws: dict = {}  # every variant of a (TP, dtype, V, std) draws the same batch
    for c in all_cases:
        draws.setdefault((c["tp"], c["dtype"], c["C"], c["scale"]), len(draws))
    for p in tps:
        todo = []
        for c in all_cases:
            name = common.case_name(c)
            if c["tp"] != p or (args.only and args.only not in name):
                continue
            if fixtures and not fixture_keep(c):
                continue
            if args.skip_existing and os.path.exists(os.path.join(args.outdir, name + ".npz")):
                continue
            todo.append((c, args.seed + draws[(c["tp"], c["dtype"], c["C"], c["scale"])]))
        if todo:
            mp.spawn(worker, args=(p, todo, args.outdir, args.small, fixtures, 29500 + p),
                     nprocs=p, join=True)


# ---- --check: ce-check on every case of OUTDIR ----

def load(path: str) -> tuple[dict, dict]:
    """The arrays (the full-vocabulary `logits` and `grad` rebuilt from the shards when absent)
    and the meta."""
    with np.load(path, allow_pickle=False) as d:
        arr = {k: d[k] for k in d.files}
    meta = json.loads(str(arr.pop("meta").reshape(-1)[0]))
    p = meta["tp"]
    for k in ("logits", "grad"):
        if k not in arr:
            arr[k] = np.concatenate([arr[f"{k}_r{r}"] for r in range(p)], -1)
    return arr, meta


def is_bf16(meta: dict) -> bool:
    return meta["dtype"] == "bf16" or meta["variant"] == "fused"


def save_grad(path: str, meta: dict, grad: np.ndarray) -> None:
    """A shard's gradient file as Megatron's tensor would be saved: bf16 as the 2-byte `V2`
    bits (ml_dtypes' .npy), which ce-check reads as stored in bf16."""
    g = np.ascontiguousarray(grad, dtype=np.float32)
    np.save(path, (g.view(np.uint32) >> 16).astype(np.uint16).view("V2") if is_bf16(meta) else g)


def stored(arr: dict, meta: dict, grad: np.ndarray) -> np.ndarray:
    """The gradient as Megatron stored it: bf16 (a bf16 logits' gradient, and every `fused`
    gradient, rounded to bf16 by its cast) tagged as such, else float32."""
    if is_bf16(meta):
        from ce_cli.io.bfloat16 import BF16
        return grad.astype(BF16)
    return grad


def options(meta: dict, semantics: str = "global", **extra):
    """The check's CheckOptions: reduction sum with the sample weights g, computed in float32;
    label smoothing in Megatron's form (ε/(V - 1) on the others) over the global V."""
    from ce_cli.verify.options import CheckOptions
    kw = dict(reduction="sum", ignore_index=-100, precision="f32")
    if meta["label_smoothing"]:
        kw.update(label_smoothing=meta["label_smoothing"], smoothing_form="others")
    kw.update(extra)
    return CheckOptions.build(None, **kw)


def your_loss(arr: dict, meta: dict) -> float:
    """Σ g_n L_n from rank 0's per-token losses (what loss.backward(g) differentiates)."""
    with np.errstate(invalid="ignore"):  # 0 x inf: 0.19.2's smoothing at std 30 (NaN, honestly)
        return float(np.sum(arr["sample_weight"] * arr["loss_r0"].astype(np.float64)))


def check_full(arr: dict, meta: dict, grad=None, loss: bool = True, **extra):
    """One process on the concatenated (S, B, V) arrays (`extra`: more settings, e.g. `fd`)."""
    from ce_cli.verify.checks import check_grad
    g = stored(arr, meta, arr["grad"] if grad is None else grad)
    return check_grad(arr["logits"], arr["labels"], grad=g, sample_weight=arr["sample_weight"],
                      loss=your_loss(arr, meta) if loss else None, options=options(meta, **extra))


def check_tokens(arr: dict, meta: dict, rank: int = 0, **extra):
    """Rank `rank`'s per-token losses, reduction none, times Megatron's loss mask (a target
    -100 gives lse - max, not 0: megatron's loss function multiplies it by the mask)."""
    from ce_cli.verify.checks import check_grad
    loss = np.where(arr["labels"] == -100, 0.0, arr[f"loss_r{rank}"].astype(np.float64))
    return check_grad(arr["logits"], arr["labels"], loss=loss,
                      options=options(meta, reduction="none", **extra))


def check_merged(arr: dict, meta: dict, grad=None, loss: bool = True, **extra):
    """`grad --shards vocab` in process: the p shards' files, the labels and g as one file each."""
    from ce_cli.verify import shards as sh
    p, g = meta["tp"], arr["grad"] if grad is None else grad
    part = meta["C"] // p
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "labels.npy"), arr["labels"])
        np.save(os.path.join(tmp, "g.npy"), arr["sample_weight"])
        files = []
        for r in range(p):
            np.save(os.path.join(tmp, f"z{r}.npy"), arr[f"logits_r{r}"])
            save_grad(os.path.join(tmp, f"grad{r}.npy"), meta, g[..., r * part:(r + 1) * part])
            files.append(sh.ShardFiles(os.path.join(tmp, f"z{r}.npy"), os.path.join(tmp, "labels.npy"),
                                       os.path.join(tmp, f"grad{r}.npy")))
        inputs = sh.BatchInputs(arrays=(("sample_weight", (os.path.join(tmp, "g.npy"),)),),
                                loss=your_loss(arr, meta) if loss else None)
        return sh.run_shards(files, "vocab", options(meta, **extra), inputs=inputs)


def global_lse(arr: dict) -> np.ndarray:
    """Every token's log-sum-exp over the V columns, in float64 from the concatenated logits."""
    z = arr["logits"].astype(np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1))


def check_one_shard(arr: dict, meta: dict, rank: int, grad=None, **extra):
    """Rank `rank` alone, the one-shard form: `--vocab-offset r V/p --vocab-size V --lse
    GLOBAL` (the global lse from the concatenated logits) with g as sample weights."""
    from ce_cli.verify.checks import check_grad
    K = meta["C"] // meta["tp"]
    g = arr[f"grad_r{rank}"] if grad is None else grad[..., rank * K:(rank + 1) * K]
    return check_grad(arr[f"logits_r{rank}"], arr["labels"], grad=stored(arr, meta, g),
                      sample_weight=arr["sample_weight"], lse=global_lse(arr),
                      options=options(meta, vocab_offset=rank * K, vocab_size=meta["C"], **extra))


def check_local(arr: dict, meta: dict, rank: int, **extra) -> list:
    """Megatron 0.19.2's smoothing as ce-check can state it for one rank, from its columns
    alone (K = V/p, the GLOBAL lse from the concatenated logits in float64): the rows whose
    label is in the rank (and the -100 rows) with `vocab_offset=0, vocab_size=K` and local
    labels; the rows whose label is in another rank (no label term here, ε/(K - 1) on every
    column) as labels in a phantom column K of `vocab_size=K + 1` with ε' = ε K/(K - 1), so
    that ε'/K = ε/(K - 1). A one-shard check cannot take a label past `vocab_size`, so the
    two are two checks. Returns both reports."""
    from ce_cli.verify.checks import check_grad
    p, V = meta["tp"], meta["C"]
    K, eps = V // p, meta["label_smoothing"]
    lse = global_lse(arr).reshape(-1)
    y = arr["labels"].reshape(-1)
    x = arr[f"logits_r{rank}"].reshape(-1, K)
    g = stored(arr, meta, arr[f"grad_r{rank}"].reshape(-1, K))
    w = arr["sample_weight"].reshape(-1)
    mine = ((y >= rank * K) & (y < (rank + 1) * K)) | (y == -100)
    out = []
    for rows, labels, size, e in ((mine, np.where(y == -100, -100, y - rank * K), K, eps),
                                  (~mine, np.full(y.shape, K), K + 1, eps * K / (K - 1))):
        if rows.any():
            out.append(check_grad(x[rows], labels[rows], grad=g[rows], sample_weight=w[rows],
                                  lse=lse[rows], options=options(meta, vocab_offset=0,
                                                                 vocab_size=size,
                                                                 label_smoothing=e, **extra)))
    return out


def failed(report) -> list:
    rep = getattr(report, "report", report)
    return [(c.name, c.note[:200]) for c in rep.checks if not c.ok]


def planted(arr: dict) -> dict:
    return {k[9:]: arr[k] for k in arr if k.startswith("grad_bug_")}


def one_shard_tally(arr: dict, meta: dict, name: str, tag: str) -> tuple[int, int, int, int]:
    """Each rank alone in the one-shard form: (checks, false alarms, planted-bug shards that
    differ from the real one, of them missed); `smooth` (#7464): (shards, 0, shards, passing)."""
    n = fa = bugs = missed = 0
    K = meta["C"] // meta["tp"]
    for r in range(meta["tp"]):
        n += 1
        ok = check_one_shard(arr, meta, r).ok
        if meta["variant"] == "smooth":
            bugs += 1
            missed += ok
            continue
        if not ok:
            fa += 1
            print(f"{tag} FALSE ALARM one-shard", name, "rank", r, flush=True)
        for bug, g in planted(arr).items():
            if np.array_equal(g[..., r * K:(r + 1) * K], arr[f"grad_r{r}"]):
                continue  # this rank's call was not changed
            bugs += 1
            if check_one_shard(arr, meta, r, grad=g).ok:
                missed += 1
                print(f"{tag} MISSED one-shard", bug, name, "rank", r, flush=True)
    return n, fa, bugs, missed


def sweep(outdir: str, only: str = "") -> None:
    import glob
    for kernel in ("1", "0"):
        os.environ["CE_CHECK_FUSED"] = kernel
        tag = f"[{kernel}]"
        n = fa = bugs = missed = real = caught = 0
        one = np.zeros(4, dtype=int)
        for path in sorted(glob.glob(os.path.join(outdir, "*.npz"))):
            name = os.path.basename(path)[:-4]
            if only and only not in name:
                continue
            arr, meta = load(path)
            n += 1
            one += one_shard_tally(arr, meta, name, tag)
            bad = {"merged": failed(check_merged(arr, meta)), "full": failed(check_full(arr, meta))}
            if meta["variant"] != "smooth":
                bad["tokens"] = failed(check_tokens(arr, meta))
            bad = {k: v for k, v in bad.items() if v}
            if meta["variant"] == "smooth":  # megatron-core's own smoothing: #7464
                real += 1
                caught += bool(bad.get("merged")) and bool(bad.get("full"))
                local = [f for r in range(meta["tp"]) for rep in check_local(arr, meta, r)
                         for f in failed(rep)]
                print(tag, "REAL #7464", "CAUGHT" if bad else "MISSED", name,
                      "local semantics:", "PASS" if not any(local) else local, flush=True)
                continue
            if bad:
                fa += 1
                print(tag, "FALSE ALARM", name, bad, flush=True)
            for bug, g in planted(arr).items():
                for how in (check_merged, check_full):
                    bugs += 1
                    r = how(arr, meta, grad=g, loss=False)
                    if getattr(r, "report", r).ok:
                        missed += 1
                        print(tag, "MISSED", bug, how.__name__, name, flush=True)
        print(f"[CE_CHECK_FUSED={kernel}] cases {n} false alarms {fa} planted bugs {bugs} (merged and"
              f" full) missed {missed}; megatron #7464 smoothing cases {real}, caught {caught};"
              f" one-shard form: {one[0]} rank checks, false alarms {one[1]}, changed shards"
              f" (planted and #7464) {one[2]}, missed {one[3]}", flush=True)
    os.environ.pop("CE_CHECK_FUSED", None)


def main():
    if "--check" in sys.argv:
        sys.argv.remove("--check")
        only = ""
        if "--only" in sys.argv:
            i = sys.argv.index("--only")
            only = sys.argv[i + 1]
            del sys.argv[i:i + 2]
        sweep(sys.argv[1], only)
        return
    tps = TPS
    if "--tp" in sys.argv:
        i = sys.argv.index("--tp")
        tps = tuple(int(v) for v in sys.argv[i + 1].split(","))
        del sys.argv[i:i + 2]
    fixtures = "--fixtures" in sys.argv
    if fixtures:
        sys.argv.remove("--fixtures")
    args = common.parse_args("megatron_cases.py")
    generate(args, tps, fixtures)


if __name__ == "__main__":
    main()
