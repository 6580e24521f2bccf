"""Training data for the workers: task examples -> token rows (completion-only labels) -> sharded batches.

Examples are tokenized once on the driver with newsray.formatting (the same prompts evaluation and
serving use) and shipped to the workers. Each epoch is a permutation seeded by seed + epoch; rank r
takes every world_size-th example of it, and the tail that does not fill a batch on every rank is
dropped, so all ranks run the same number of micro-batches (DDP needs that). Optimizer step k uses
micro-batches k*accum ... (k+1)*accum - 1 of that endless sequence, so a step number alone fixes
the data position on resume.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from newsray.errors import ConfigError
from newsray.formatting import Formatter, pad_batch

if TYPE_CHECKING:
    from newsray.config import Config
    from newsray.tasks import Task

Row = dict[str, list[int]]


@dataclass
class TrainData:
    """Tokenized train/val rows plus what the driver learned making them."""

    train: list[Row]
    val: list[Row]
    pad_id: int
    dropped_train: int
    dropped_val: int
    data_hashes: dict[str, str]
    source: str  # the training file, for messages


def tokenize_examples(cfg: Config, task: Task, tokenizer: Any) -> TrainData:
    """Load the task's splits and format them; too-long examples are dropped with a warning."""
    splits = task.load()  # a broken data line raises the task's DataError here
    fmt = Formatter.for_tokenizer(tokenizer, cfg.model.max_seq_length)
    rows: dict[str, list[Row]] = {"train": [], "val": []}
    dropped = {"train": 0, "val": 0}
    for name, examples in (("train", splits.train), ("val", splits.val)):
        for ex in examples:
            row = fmt.example(ex.messages(), ex.answer)
            if row is None:
                dropped[name] += 1
            else:
                rows[name].append(row)
    files = task.files()
    source = str(files.get("train") or next(iter(files.values())))
    if dropped["train"] or dropped["val"]:
        print(f"newsray: dropped {dropped['train']} train / {dropped['val']} val examples longer than "
              f"model.max_seq_length={cfg.model.max_seq_length} tokens", file=sys.stderr)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eot_id
    return TrainData(rows["train"], rows["val"], pad_id, dropped["train"], dropped["val"], task.data_hashes(), source)


def check_batch_fits(cfg: Config, data: TrainData) -> None:
    """One global batch (per_device_batch_size x num_workers) must fit in the training data."""
    need = cfg.train.per_device_batch_size * cfg.train.num_workers
    have = len(data.train)
    if have < need:
        extra = f" ({data.dropped_train} more were longer than model.max_seq_length)" if data.dropped_train else ""
        raise ConfigError(
            f"train.per_device_batch_size={cfg.train.per_device_batch_size} x train.num_workers={cfg.train.num_workers} "
            f"= {need} examples per step, but {data.source} gives only {have} usable training examples{extra}; "
            "lower the batch size or the number of workers.")


def micro_batches_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Full micro-batches each rank gets from one pass over `n` examples."""
    return n // (batch_size * world_size)


def total_steps(cfg: Config, n_train: int) -> int:
    """train.max_steps, or the optimizer steps of train.epochs passes over the data."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = micro_batches_per_epoch(n_train, cfg.train.per_device_batch_size, cfg.train.num_workers)
    return max(1, math.ceil(cfg.train.epochs * per_epoch / cfg.train.grad_accum_steps))


class ShardedBatches:
    """Deterministic per-rank micro-batches: micro-batch g of rank r, for any g (epochs repeat)."""

    MEGABATCH = 50  # group_by_length sorts within windows of this many global batches (as transformers' LengthGroupedSampler)

    def __init__(self, rows: list[Row], batch_size: int, rank: int, world_size: int, seed: int, pad_id: int,
                 group_by_length: bool = False):
        self.rows, self.bs, self.rank, self.world = rows, batch_size, rank, world_size
        self.seed, self.pad_id, self.group_by_length = seed, pad_id, group_by_length
        self.per_epoch = micro_batches_per_epoch(len(rows), batch_size, world_size)
        self._epoch, self._shard = -1, []

    def _shard_of(self, epoch: int) -> list[int]:
        import torch

        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.rows), generator=g).tolist()
            usable = self.per_epoch * self.bs * self.world
            order = order[:usable]
            if self.group_by_length:
                order = self._grouped(order, g)
            self._epoch, self._shard = epoch, order[self.rank::self.world]
        return self._shard

    def _grouped(self, order: list[int], g: Any) -> list[int]:
        """`order` re-arranged so each global batch (bs x world consecutive items) holds similar lengths.

        Within windows of MEGABATCH global batches the examples are sorted by length, cut into
        global batches, and the batches of the whole epoch are shuffled: random batches, little
        padding. Rank r's micro-batch i is drawn from global batch i, so ranks stay in step.
        """
        import torch

        glob = self.bs * self.world
        window = glob * self.MEGABATCH
        blocks = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: len(self.rows[i]["input_ids"]), reverse=True)
            blocks += [chunk[b:b + glob] for b in range(0, len(chunk), glob)]
        return [i for k in torch.randperm(len(blocks), generator=g).tolist() for i in blocks[k]]

    def indices(self, g: int) -> list[int]:
        """Example indices of this rank's micro-batch number `g` (0-based, across epochs)."""
        epoch, i = divmod(g, self.per_epoch)
        return self._shard_of(epoch)[i * self.bs:(i + 1) * self.bs]

    def batch(self, g: int) -> dict[str, Any]:
        """Micro-batch `g` as right-padded tensors (labels -100 on padding, by position)."""
        import torch

        padded = pad_batch([self.rows[i] for i in self.indices(g)], self.pad_id)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in padded.items()}


def eval_batches(rows: list[Row], batch_size: int, rank: int, world_size: int, pad_id: int) -> list[dict[str, Any]]:
    """This rank's share of the validation rows, in fixed order and padded per batch."""
    import torch

    mine = rows[rank::world_size]
    out = []
    for i in range(0, len(mine), batch_size):
        padded = pad_batch(mine[i:i + batch_size], pad_id)
        out.append({k: torch.tensor(v, dtype=torch.long) for k, v in padded.items()})
    return out
