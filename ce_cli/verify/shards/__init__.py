"""Sharded batches: a row-split (data-parallel ranks) or vocabulary-split (tensor-parallel ranks)
batch checked shard by shard, never concatenated, and the per-shard reports merged into one.

- `run.py`: `run_shards`, the run of `grad --shards` / `binary --shards` (describe, pass 1,
  pass 2, merge) and the settings shards take;
- `plan.py`: the shards' files and places along the split axis, the `Mapper`;
- `files.py`: globs, loading where the code runs (local or fsspec URLs), shapes;
- `inputs.py`: the batch's other inputs (`BatchInputs`) and each shard's part of them;
- `rows.py`, `vocab.py`, `binary.py`: row, vocabulary and sigmoid BCE shards, their two passes;
- `share.py`: a shard's share of the batch's reduced loss and z-loss checks;
- `merge.py`: the per-shard reports merged into one;
- `linear.py`, `linear_run.py`: `linear --shards rows`, the shard's and the client's side
  (imported from there: they need `ce_cli.verify.linear`, which `grad --shards` does not).
"""

from ce_cli.verify.shards.files import describe, expand, load
from ce_cli.verify.shards.inputs import NO_INPUTS, BatchInputs, batch_inputs
from ce_cli.verify.shards.merge import merge_reports
from ce_cli.verify.shards.plan import (LocalMapper, Mapper, Shard, ShardedReport, ShardFiles,
                                       ShardPlan, ShardSummary, make_plan, pair_files)
from ce_cli.verify.shards.run import check_shard, run_shards
from ce_cli.verify.shards.vocab import merge_row_stats, shard_row_stats

__all__ = ["NO_INPUTS", "BatchInputs", "LocalMapper", "Mapper", "Shard", "ShardFiles",
           "ShardPlan", "ShardSummary", "ShardedReport", "batch_inputs", "check_shard",
           "describe", "expand", "load", "make_plan", "merge_reports", "merge_row_stats",
           "pair_files", "run_shards", "shard_row_stats"]
