"""Finetuning batches: examples padded into micro-batches (or packed into rows without leaks
between examples), dealt to ranks, resumable exactly.

    python finetune/run_sft.py --config configs/sft_demo.yaml --packing

Finetuning sets are small, so they are tokenized once, in memory. Every epoch is a seeded
permutation, dealt round-robin to ranks in equal shares, cut into fixed-size micro-batches,
each padded to its longest example. The loader's state is (epoch, batch): resuming is exact;
resuming on another number of processes deals the rest of the epoch again (`ExampleLoader`).
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch

from ..errors import UsageError

def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example: pad tokens get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
             "labels": torch.full((len(examples), width), -100, dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(e["labels"])
    return batch


# ----------------------------------------------------------------------------- packing

def pack(examples: list[dict], block_size: int, generator: torch.Generator) -> list[list[dict]]:
    """Examples grouped into rows of at most `block_size` tokens, in a seeded random order.

    Best-fit decreasing: longest first, each into the row it fills most (TRL's default), which
    leaves a few percent of padding where sequential packing leaves a fraction of a row per
    row; the rows are then shuffled, so a batch is not all long or all short examples.
    """
    rows, free = [], []  # free: sorted (space left, row) of the rows that can take more
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, row = free.pop(i)
        else:
            space, row = block_size, len(rows)
            rows.append([])
        rows[row].append(e)
        if space - n >= 2:  # an example has at least 2 tokens (one of them a label)
            bisect.insort(free, (space - n, row))
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [rows[i] for i in order]


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict:
    """Rows of packed examples as one batch with `position_ids` restarting at each example.

    Without an attention mask and with restarting position ids, transformers' mask builder
    limits attention to each example (its packed-sequence detection; flash-attention-2 reads
    the same ids as variable-length sequences). Each example's first label is -100: after the
    loop's shift it would be the previous example's last target. The padding that ends a row is
    a segment of its own, with no labels; `attention_mask` marks it 0 only so the loop counts
    real tokens (it is not given to the model when `position_ids` are there).
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "labels": torch.full((len(rows), width), -100, dtype=torch.long),
             "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            batch["input_ids"][r, at:at + n] = torch.tensor(e["input_ids"])
            batch["labels"][r, at + 1:at + n] = torch.tensor(e["labels"][1:])
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
        batch["attention_mask"][r, :at] = 1
        batch["position_ids"][r, at:] = torch.arange(width - at)
    return batch


class ExampleLoader:
    """Endless micro-batches of this rank's share of each epoch; state is (epoch, batch).

    With `packing`, a micro-batch is `batch_size` rows of packed examples (`pack`), the rows of
    an epoch computed again from its permutation, so the state stays (epoch, batch).

    A run may continue on another number of processes (`restore`): the examples each saved
    rank was dealt in its current epoch and had not consumed yet are dealt again, round-robin
    in equal shares, to this run's ranks, each cutting its share into micro-batches (packed
    rows with `packing`) for the rest of that epoch; then the next epoch starts normally for
    the new layout. While in that rest the state also holds "rest", this rank's share (example
    indices), so that an exact resume or yet another change of processes continues from it.
    No example is trained on twice in an epoch; the only ones skipped are those an epoch's end
    always skips: fewer than `world_size` examples left over when the shares are made equal,
    and on each rank the fewer than `batch_size` examples (with packing: the examples of the
    fewer than `batch_size` rows) that do not fill a last micro-batch. (With packing, ranks
    pack different numbers of rows and may be in different epochs: a rank behind hands over
    the rest of its epoch and its shares of the epochs up to the newest one, which is the
    epoch the re-dealt rest belongs to: an example may then be in it once for each epoch.)
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, packing_block_size: Optional[int] = None):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.packing_block_size = packing_block_size
        self.epoch, self.batch = 0, 0
        self.rest: Optional[list[int]] = None  # this rank's share of a re-dealt epoch's rest
        if len(self._batches(0)) < 1:
            unit = "packed rows" if packing_block_size else "examples"
            raise UsageError(f"{len(examples)} training examples cannot fill one batch of "
                             f"{batch_size} {unit} on each of {world_size} processes (add data "
                             "or lower --per_device_train_batch_size)")

    def _order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.examples), generator=g).tolist()
        per_rank = len(self.examples) // world_size
        return perm[rank::world_size][:per_rank]

    def _units(self, epoch: int, rank: int, world_size: int,
               rest: Optional[list[int]] = None) -> list:
        """What rank `rank` of `world_size` trains on in `epoch`, in order: example indices, or
        with packing rows of them (all of them, the tail that fills no micro-batch included).
        `rest`: the indices it was dealt for the rest of a re-dealt epoch, instead of its share
        of the epoch's permutation."""
        mine = self._order(epoch, rank, world_size) if rest is None else list(rest)
        if not self.packing_block_size:
            return mine
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7919 * rank)
        # packed by length alone, so indices beside the lengths give the rows' indices
        keyed = [{"input_ids": self.examples[i]["input_ids"], "index": i} for i in mine]
        return [[e["index"] for e in row] for row in pack(keyed, self.packing_block_size, g)]

    def _batches(self, epoch: int, rest: Optional[list[int]] = None) -> list[list]:
        """This rank's micro-batches of `epoch`, each a list of examples (or of packed rows)."""
        units, size = self._units(epoch, self.rank, self.world_size, rest), self.batch_size
        if self.packing_block_size:
            units = [[self.examples[i] for i in row] for row in units]
        else:
            units = [self.examples[i] for i in units]
        return [units[i * size:(i + 1) * size] for i in range(len(units) // size)]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in the current epoch (with packing, each epoch packs differently)."""
        return len(self._batches(self.epoch, self.rest))

    def state_dict(self) -> dict:
        # batch_size: what `batch` counts in, for a resume with another micro-batch size
        state = {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size,
                 "seed": self.seed}
        if self.rest is not None:
            state["rest"] = list(self.rest)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        rest = state.get("rest")
        self.rest = None if rest is None else [int(i) for i in rest]

    def restore(self, states: list[dict]) -> Optional[str]:
        """Continue from every saved rank's state (`states`, in rank order).

        With as many ranks and the same micro-batch size, exactly (`load_state_dict`).
        Otherwise what each saved rank had not consumed of its current epoch (its epoch's
        micro-batches are made again to know which; with packing, a rank behind the newest
        epoch adds its shares of the epochs up to it) is interleaved in rank order, which for
        ranks in step is the epoch's own order, and dealt to this run's ranks for the rest of
        that epoch. Returns a line saying what was dealt.
        """
        for r, state in enumerate(states):
            if not isinstance(state, dict) or "epoch" not in state or "batch" not in state:
                raise UsageError(f"the data state of process {r} has no epoch and batch (not a "
                                 "finetuning checkpoint?)")
            if state.get("seed", self.seed) != self.seed:  # the epochs' permutations
                raise UsageError(f"the checkpoint's data state has seed={state['seed']} but this "
                                 f"run has seed={self.seed} (resume with the same --seed)")
        saved_size = lambda st: int(st.get("batch_size") or self.batch_size)  # noqa: E731
        if len(states) == self.world_size and saved_size(states[self.rank]) == self.batch_size:
            self.load_state_dict(states[self.rank])
            return None
        before, newest = len(states), max(int(st["epoch"]) for st in states)
        left = []  # each saved rank's examples not consumed, in the order it had them
        for r, st in enumerate(states):
            epoch, done = int(st["epoch"]), int(st["batch"]) * saved_size(st)
            units = self._units(epoch, r, before, st.get("rest"))
            if done > len(units):
                unit = "packed rows" if self.packing_block_size else "examples"
                raise UsageError(f"the data state of process {r} is past the end of epoch "
                                 f"{epoch} ({done} {unit} consumed, {len(units)} here; resume "
                                 "with the same data and --seed)")
            mine = units[done:]
            for later in range(epoch + 1, newest + 1):
                mine += self._units(later, r, before)
            left.append([i for u in mine for i in (u if self.packing_block_size else [u])])
        pool = [mine[at] for at in range(max(map(len, left), default=0)) for mine in left
                if at < len(mine)]
        share = len(pool) // self.world_size
        self.rest = pool[:share * self.world_size][self.rank::self.world_size]
        self.epoch, self.batch = newest, 0
        procs = lambda n: f"{n} process{'es' if n != 1 else ''}"  # noqa: E731
        return (f"data: the rest of epoch {newest} on {procs(before)}, {len(pool)} examples, is "
                f"dealt to {procs(self.world_size)} ({share} each); then epoch {newest + 1} "
                "starts")

    def __iter__(self):
        collate_fn = collate_packed if self.packing_block_size else collate
        while True:
            batches = self._batches(self.epoch, self.rest)
            while self.batch < len(batches):
                picked = batches[self.batch]
                self.batch += 1  # counted before it is handed out: the state says "next"
                yield collate_fn(picked, self.pad_id)
            self.epoch, self.batch, self.rest = self.epoch + 1, 0, None


def eval_batches(examples: list[dict], batch_size: int, pad_id: int) -> Optional[list[dict]]:
    """The held-out examples as batches, in order (loop.evaluate deals them to ranks)."""
    if not examples:
        return None
    return [collate(examples[i:i + batch_size], pad_id)
            for i in range(0, len(examples), batch_size)]
