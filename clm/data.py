"""Streaming text -> tokens -> packed blocks, sharded by rank and worker, resumable exactly.

    python bench/data_throughput.py --dataset_name data/demo_corpus --tokenizer_name data/demo_tokenizer

Sources are `datasets` streaming `IterableDataset`s: a Hub dataset by name (parquet, read in row
groups), a local folder laid out like one, or local `.txt`/`.jsonl`/`.parquet` globs. Every rank
and every DataLoader worker is a stream with its own plan for each pass over the data: whole
shards dealt round-robin (else every k-th document of every shard), the partition
`datasets.distributed.split_dataset_by_node` makes, but built here, shard by shard, so that a
position is stated in the dataset's shards rather than in one rank's view of them. The streams
are disjoint and together cover the data.

Ordering is ours, not `IterableDataset.shuffle`'s, because a shuffle buffer cannot be resumed
without storing its contents. Each pass the shard order is permuted (seeded from the seed and
the pass); each worker reads its shards as `shuffle_readers` readers side by side, so documents
come from that many places in the dataset at once; documents are taken in windows of
`shuffle_window` that are permuted by a generator seeded from (seed, epoch, window, rank,
worker); they are packed into blocks, and the blocks are emitted in windows of
`shuffle_buffer_blocks`, each permuted, so that a micro-batch holds pieces of many documents.
The position of the next block is therefore fully described by where its block window starts
(pass, document window, each reader's [shard in its plan, documents taken] at that window's
start, document, token offset), the block window's number and the blocks of it already emitted:
a resume opens the readers' shards and skips within them (one parquet row group), re-reads one
document window, re-packs at most two block windows and drops what was already used. Nothing is
carried in the state but these numbers.

On another number of ranks or workers (`BlockLoader.restore`), what is left of every saved
stream's pass, from the start of its document window, is dealt to the new streams as shard
pieces; they finish it and start the next pass together. No document is skipped; per saved
stream at most one document window and one block window are read again.

When a worker's shards run out it starts its next epoch on its own (new shard order and window
permutation), so ranks with uneven data never wait for each other and nobody hangs; the run's
length is set by `max_steps`, not by the data.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import glob
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .config import DataConfig
from .errors import UsageError, first_line

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKENIZE_CHUNK = 128  # documents per tokenizer call: large enough to amortise, small for latency
READ_BATCH = 256  # documents per read from a shard


# ----------------------------------------------------------------------------- sources

def resolve_files(patterns: list[str] | str, option: str) -> tuple[list[str], str]:
    """Expand globs into a sorted file list and the `datasets` builder that reads them."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [f for f in matched if os.path.isfile(f)]
        if not matched:
            raise UsageError(f"{option} '{pattern}' matches no file (check the path or the glob)")
        files += matched
    exts = {Path(f).suffix.lower() for f in files}
    unknown = sorted(exts - set(BUILDERS))
    if unknown:
        raise UsageError(f"{option}: unsupported file type {unknown[0]!r} "
                         "(use .txt, .jsonl or .parquet)")
    builders = {BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise UsageError(f"{option} mixes file types {sorted(exts)} (pass one type per option)")
    return files, builders.pop()


def dataset_has_split(cfg: DataConfig, split: str) -> bool:
    if cfg.train_files:
        return False
    return split in _split_names(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_revision)


@functools.lru_cache(maxsize=None)
def _split_names(name: str, config: str | None, revision: str | None) -> tuple[str, ...]:
    """A Hub request: asked once per dataset per process (training and held-out both need it)."""
    from datasets import get_dataset_split_names

    try:
        return tuple(get_dataset_split_names(name, config, revision=revision))
    except Exception:  # unreachable Hub: the training split's own load reports it
        return ()


def open_source(cfg: DataConfig, split: str = "train"):
    """The documents of `split` as a streaming `datasets.IterableDataset` with one text column.

    `split` is "train" or "validation"; local files take `--train_files`/`--validation_files`.
    """
    from datasets import load_dataset

    files = cfg.train_files if split == "train" else cfg.validation_files
    if files:
        option = "--train_files" if split == "train" else "--validation_files"
        paths, builder = resolve_files(files, option)
        what = f"{option} {' '.join(files)}"
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        load = lambda: load_dataset(builder, data_files={split: paths}, split=split,  # noqa: E731
                                    streaming=cfg.streaming, **kwargs)
    else:
        what = f"--dataset_name {cfg.dataset_name}"
        load = lambda: load_dataset(cfg.dataset_name, cfg.dataset_config_name,  # noqa: E731
                                    split=split, revision=cfg.dataset_revision,
                                    streaming=cfg.streaming)
    empty = UsageError(f"{what} holds no documents (check the files or the split)")
    if files and all(os.path.getsize(p) == 0 for p in paths):
        raise empty
    try:
        ds = load()
    except StopIteration:  # datasets' schema inference on data without a single record
        raise empty from None
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"could not load {what}: {first} (check the name, revision and "
                         "network; offline, use --train_files or a local folder)") from None
    if not cfg.streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 256)))
    first = next(iter(ds.take(1)), None)
    if first is None:
        raise empty
    if cfg.text_column not in first:
        raise UsageError(f"--text_column '{cfg.text_column}' not found in {what}; columns found: "
                         f"{sorted(first)} (pass --text_column with one of them)")
    # One shard per parquet row group, so ranks and workers can seek and share work finely.
    return ds.reshard().select_columns([cfg.text_column])


def is_heldout(text: str, percentage: float) -> bool:
    """Whether a document belongs to the carved held-out set: a hash, so order-independent."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < percentage / 100 * 2**64


def heldout_source(cfg: DataConfig) -> str | None:
    """Where the held-out set comes from: 'files', 'split', 'carve' (hash of the text) or None."""
    if cfg.validation_files:
        return "files"
    if dataset_has_split(cfg, "validation"):
        return "split"
    return "carve" if cfg.validation_split_percentage > 0 else None


# ----------------------------------------------------------------------------- tokenize + pack

def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"could not load tokenizer '{name}': {first} "
                         "(pass --tokenizer_name with a Hub name or a local tokenizer folder)") from None
    if tok.eos_token_id is None:
        raise UsageError(f"tokenizer '{name}' has no EOS token (documents are joined by EOS; "
                         "use a tokenizer with an eos_token)")
    return tok


def encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text followed by EOS (no other special tokens).

    Special-token text inside a document ("<|endoftext|>" in a web page) is encoded as the
    plain text it is: otherwise it would become a real EOS mid-document, a document boundary
    the data never had. The only EOS ids in the stream are the ones appended here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no offsets, no Python BatchEncoding
        # A flag on the shared backend (transformers' own calls set it every time); restored so
        # that other direct users of the backend see it as they left it.
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before
    else:
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [np.array(x + [eos], dtype=np.int32) for x in ids]


def pack(docs: Iterator[tuple[dict, np.ndarray]], block_size: int, skip: int = 0):
    """Cut a stream of token documents into full blocks; yield (block, position, documents).

    No token is dropped or repeated between blocks: a document's tail is carried into the next
    block, which may span documents, windows and epochs. `skip` drops the first tokens of the
    first document (the resume offset). The position is that of the next token (the document's
    and the offset in it); `documents` names the documents the block holds pieces of.
    """
    pieces, have, names = [], 0, []
    for pos, tokens in docs:
        i, skip = skip, 0
        name = (pos.get("epoch"), pos.get("window"), pos.get("doc"))
        while i < len(tokens):
            take = min(block_size - have, len(tokens) - i)
            pieces.append(tokens[i:i + take])
            names.append(name)
            have, i = have + take, i + take
            if have == block_size:
                yield np.concatenate(pieces), {**pos, "offset": i}, names
                pieces, have, names = [], 0, []


def shuffle_blocks(make_blocks, size: int, seed: list[int], resume: Optional[dict] = None):
    """Emit the blocks of `make_blocks(start)` in windows of `size`, each window permuted.

    Consecutive blocks of a packed stream come from the same few documents; drawing a
    micro-batch from a permuted window of `size` blocks makes its sequences nearly independent.
    Yields (block, documents, state); `state` resumes right after that block: it names where
    the current window starts in the stream, the window's number and how many of its blocks
    were emitted. A resume re-packs that window (and the next one's blocks read so far), so its
    cost is at most 2 x `size` blocks however much data was consumed. While a window is emitted
    the next one is read a block at a time, so the reader never stalls for a whole window.
    """
    start = resume["start"] if resume else None
    n, skip = (resume["window"], resume["emitted"]) if resume else (0, 0)
    source = make_blocks(start)
    window = list(itertools.islice(source, size))
    while window:
        order = np.random.default_rng([*seed, n]).permutation(len(window)) if size > 1 \
            else range(len(window))
        ahead = []
        for i, j in enumerate(order):
            if len(ahead) < size:
                ahead.extend(itertools.islice(source, 1))
            if i >= skip:
                yield window[j][0], window[j][2], {"start": start, "window": n, "emitted": i + 1}
        start, window, n, skip = window[-1][1], ahead, n + 1, 0


def _epoch_key(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=4).digest(),
                          "little") | 1


# ----------------------------------------------------------------------------- work plans
# A stream's pass over the data is a plan: one list of work items per reader. An item
# [shard, first, step] is the documents first, first + step, first + 2 step, ... of one shard
# (a parquet row group, or a file). A reader's position is [item index, documents taken from
# that item], so "what is left of this pass" is a list of items, whatever the number of ranks
# and workers that made it: that is what lets a run continue on another number of processes.

def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order (the permutation `datasets` applies for `set_epoch`)."""
    order = list(range(num_shards))
    if shuffle:
        np.random.default_rng(_epoch_key(seed, epoch)).shuffle(order)
    return order


def stream_plan(order: list[int], stream: int, streams: int, readers: int) -> list[list]:
    """Stream `stream` of `streams`' plan for a pass over the shards in `order`.

    Whole shards, dealt round-robin, when there are enough for every stream (split over up to
    `readers` readers); else every `streams`-th document of every shard, the phase rotating
    from shard to shard so that small shards do not all feed the same streams (each shard is
    then decoded by every stream: `few_shards_warning` says so at start-up).
    """
    if len(order) >= streams:
        mine = order[stream::streams]
        readers = max(1, min(readers, len(mine)))
        return [[[g, 0, 1] for g in mine[j::readers]] for j in range(readers)]
    return [[[g, (stream + c) % streams, streams] for c, g in enumerate(order)]]


def few_shards_warning(num_shards: int, world_size: int, num_workers: int) -> Optional[str]:
    """A line for the user when the training data has fewer shards than streams, else None.

    Then every stream reads every shard and keeps every k-th document (`stream_plan`), so
    each shard is decoded once per stream. Sharing fewer shards between fewer streams each
    would decode less, but a stream whose shards are smaller than its share would get no
    document, and one .txt/.jsonl file cannot be split into pieces to read apart: the fix is
    more shards (more, smaller files or parquet row groups) or fewer streams.
    """
    streams = world_size * max(1, num_workers)
    if num_shards >= streams:
        return None
    fix = [f"split the data into at least {streams} files or parquet row groups"]
    if num_shards >= world_size and num_workers > 1:
        fix.insert(0, f"pass --dataloader_num_workers {num_shards // world_size}")
    return (f"warning: the training data has {_n(num_shards, 'shard')} for {streams} streams "
            f"({_n(world_size, 'process')} x {_n(max(1, num_workers), 'stream')} each), so "
            f"every stream decodes all of it and keeps 1 document in {streams} "
            f"({' or '.join(fix)})")


def remaining_items(plan: list[list], positions: list) -> list[list]:
    """The items of `plan` not yet taken by readers at `positions`, each starting where its
    reader stopped."""
    left = []
    for items, (index, taken) in zip(plan, positions):
        for k, (shard, first, step) in enumerate(items[index:]):
            left.append([shard, first + step * taken, step] if k == 0 else [shard, first, step])
    return left


def deal(items: list[list], streams: int, readers: int) -> list[list[list]]:
    """Split `items` into one plan per stream: whole items round-robin, each item cut into
    interleaved parts first when there are fewer items than streams."""
    if items and len(items) < streams:
        parts = -(-streams // len(items))
        items = [[g, first + step * i, step * parts] for g, first, step in items
                 for i in range(parts)]
    plans = []
    for t in range(streams):
        mine = items[t::streams]
        n = max(1, min(readers, len(mine)))
        plans.append([mine[j::n] for j in range(n)] if mine else [])
    return plans


class _Reader:
    """One reader's walk through its plan's items, from a position; `take(n)` documents."""

    def __init__(self, open_item, items: list, position=(0, 0)):
        self.open_item, self.items = open_item, items
        self.index, self.taken = position
        self._iter, self._buffer = None, []

    @property
    def position(self) -> list[int]:
        return [self.index, self.taken]

    def take(self, n: int) -> list[str]:
        """Up to `n` documents; fewer only when the plan is finished."""
        out = []
        while len(out) < n and self.index < len(self.items):
            if not self._buffer:
                if self._iter is None:
                    self._iter = self.open_item(self.items[self.index], self.taken)
                batch = next(self._iter, None)
                if batch is None:
                    self.close()
                    self.index, self.taken = self.index + 1, 0
                    continue
                self._buffer = batch
            k = min(n - len(out), len(self._buffer))
            out += self._buffer[:k]
            self._buffer, self.taken = self._buffer[k:], self.taken + k
        return out

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()
        self._iter, self._buffer = None, []


@dataclass
class StreamSpec:
    """Which slice of which source a PackedBlocks stream reads."""

    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    window: int = 1024
    shuffle_blocks: int = 1      # blocks permuted together (1: stream order)
    readers: int = 1             # shard groups read side by side when shuffling
    select: str = "all"          # "all", "train" (not held out) or "heldout"
    heldout_percentage: float = 0.0
    infinite: bool = True        # cycle into new epochs (training) or stop at the end (eval)


class PackedBlocks(torch.utils.data.IterableDataset):
    """Micro-batches `{input_ids, attention_mask, labels, _state}` of packed blocks for one rank.

    Iterated by a DataLoader (workers or not) through `BlockLoader`, which keeps the states.
    """

    def __init__(self, source, tokenizer, block_size: int, batch_size: int, spec: StreamSpec,
                 text_column: str = "text"):
        self.source, self.tokenizer, self.spec = source, tokenizer, spec
        self.block_size, self.batch_size, self.text_column = block_size, batch_size, text_column
        self.resume_states: list[Optional[dict]] = [None] * max(1, spec.num_workers)
        self.worker_offset = 0

    def plan(self, epoch: int, worker: int, spec: Optional[StreamSpec] = None) -> list[list]:
        """This worker's plan for pass `epoch` over the data (see `stream_plan`); `spec`: that
        of another layout of the same stream (a saved run's)."""
        s = spec or self.spec
        workers = max(1, s.num_workers)
        order = shard_order(self.source.num_shards, s.seed, epoch, s.shuffle)
        return stream_plan(order, workers * s.rank + worker, workers * s.world_size,
                           s.readers if s.shuffle else 1)

    def _open_item(self, item, taken: int):
        """The documents of one work item from its `taken`-th on, in batches (a generator)."""
        shard, first, step = item
        ds = self.source.shard(num_shards=self.source.num_shards, index=shard)
        first += step * taken
        if first:
            ds = ds.skip(first)  # within one row group (or file): what a datasets seek reads
        seen = 0
        stream = ds.iter(batch_size=READ_BATCH)
        try:
            for batch in stream:
                texts = batch[self.text_column]
                kept = texts[(-seen) % step::step] if step > 1 else texts
                seen += len(texts)
                if kept:
                    yield kept
        finally:
            stream.close()

    def _keep(self, text) -> bool:
        if not text:
            return False
        s = self.spec
        if s.select == "all":
            return True
        return is_heldout(text, s.heldout_percentage) == (s.select == "heldout")

    def documents(self, worker: int, resume: Optional[dict] = None):
        """Yield (position, tokens) for each document of this worker's stream, from `resume` on.

        A window takes `window / readers` documents from each reader still going; its position
        is the pass's plan (None: the standard one of its epoch) and the readers' positions at
        its start.
        """
        s = self.spec
        epoch, plan = (resume["epoch"], resume.get("plan")) if resume else (0, None)
        while True:
            items = plan if plan is not None else self.plan(epoch, worker)
            window, first_doc, positions = 0, 0, [(0, 0)] * len(items)
            if resume:
                window, first_doc, positions = resume["window"], resume["doc"], resume["readers"]
                resume = None
            from_start = plan is None and window == 0 and first_doc == 0 and \
                not any(i or t for i, t in positions)
            found = False
            readers = [_Reader(self._open_item, its, pos) for its, pos in zip(items, positions)]
            per_reader = -(-s.window // max(1, len(readers)))
            try:
                while True:
                    at_start = [r.position for r in readers]
                    texts = [t for r in readers for t in r.take(per_reader)]
                    if not texts:
                        break
                    texts = [t for t in texts if self._keep(t)]
                    found = found or bool(texts)
                    if s.shuffle:
                        rng = np.random.default_rng([s.seed, epoch, window, s.rank, worker])
                        texts = [texts[i] for i in rng.permutation(len(texts))]
                    pos = {"epoch": epoch, "plan": plan, "window": window, "readers": at_start}
                    for lo in range(first_doc, len(texts), TOKENIZE_CHUNK):
                        chunk = texts[lo:lo + TOKENIZE_CHUNK]
                        for j, tokens in enumerate(encode(self.tokenizer, chunk)):
                            yield {**pos, "doc": lo + j}, tokens
                    first_doc, window = 0, window + 1
            finally:
                for reader in readers:
                    reader.close()
            if not s.infinite:
                return
            if from_start and not found:  # cycling an empty stream would spin forever
                raise UsageError(f"rank {s.rank} worker {worker} got no documents (fewer "
                                 "documents than ranks x workers? lower "
                                 "--dataloader_num_workers or add data)")
            epoch, plan = epoch + 1, None

    def blocks(self, worker: int, resume: Optional[dict] = None):
        """Yield (block, documents, state) of this worker's stream, from `resume` on."""
        s = self.spec

        def packed(start):
            return pack(self.documents(worker, start), self.block_size,
                        start["offset"] if start else 0)
        size = s.shuffle_blocks if s.shuffle else 1
        yield from shuffle_blocks(packed, size, [s.seed, s.rank, worker, 0xB10C], resume)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.spec.num_workers)
        physical = info.id if info else 0
        if (info.num_workers if info else 0) != self.spec.num_workers:
            raise RuntimeError("PackedBlocks must be iterated with its spec's num_workers")
        worker = (physical + self.worker_offset) % workers
        batch, docs, state = [], set(), None
        for block, names, state in self.blocks(worker, self.resume_states[worker]):
            batch.append(block)
            docs.update(names)
            if len(batch) == self.batch_size:
                yield self._collate(batch, {"worker": worker, **state}, len(docs))
                batch, docs = [], set()
        if batch:  # finite streams end with a short batch
            yield self._collate(batch, {"worker": worker, **state}, len(docs))

    @staticmethod
    def _collate(blocks, state, documents: int):
        ids = torch.from_numpy(np.stack(blocks)).long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "_state": state, "_documents": documents}


class BlockLoader:
    """The training data of one rank: iterate micro-batches; `state_dict()` resumes exactly.

    The DataLoader hands out batches round-robin over its workers, so after `batches` batches
    the next one comes from worker `batches % num_workers`; on resume the workers are rotated so
    the new DataLoader's first worker plays that one, each starting from its own saved position.
    """

    def __init__(self, blocks: PackedBlocks, pin_memory: bool = False, prefetch_factor: int = 4):
        self.blocks, self.pin_memory, self.prefetch_factor = blocks, pin_memory, prefetch_factor
        self.worker_states: list[Optional[dict]] = [None] * max(1, blocks.spec.num_workers)
        self.batches = 0
        self.documents_seen = 0  # distinct documents summed over micro-batches (a statistic)

    # What a resume can change: the layout (ranks, workers, micro-batch); the rest must match.
    LAYOUT = ("rank", "world_size", "num_workers", "batch_size")

    def _meta(self) -> dict:
        s = self.blocks.spec
        return {"rank": s.rank, "world_size": s.world_size, "num_workers": s.num_workers,
                "block_size": self.blocks.block_size, "batch_size": self.blocks.batch_size,
                "seed": s.seed, "shuffle": s.shuffle, "window": s.window,
                "shuffle_blocks": s.shuffle_blocks, "readers": s.readers}

    def state_dict(self) -> dict:
        return {**self._meta(), "batches": self.batches,
                "workers": copy.deepcopy(self.worker_states)}

    def _check(self, state: dict, keys) -> None:
        meta = self._meta()
        for key in keys:
            if state.get(key) != meta[key]:
                raise UsageError(f"the checkpoint's data state has {key}={state.get(key)} but "
                                 f"this run has {key}={meta[key]} (resume with the same {key})")

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank's streams stopped (same ranks and workers)."""
        self._check(state, [k for k in self._meta() if k != "batch_size"])
        self.batches = state["batches"]
        self.worker_states = copy.deepcopy(state["workers"])

    def restore(self, states: list[dict]) -> Optional[str]:
        """Continue from every rank's saved state (`states`, in rank order).

        With the same ranks and workers, exactly (`load_state_dict`). Otherwise the rest of
        each saved stream's pass, from the start of the document window it was in, is dealt
        to this run's streams, which then start the next pass together: no document is
        skipped, and those of each saved stream's last document window and block window that
        were already trained on are read again. Returns a line saying what was redistributed.
        """
        s = self.blocks.spec
        for state in states:
            self._check(state, [k for k in self._meta() if k not in self.LAYOUT])
        if len(states) == s.world_size and all(
                st["world_size"] == s.world_size and st["num_workers"] == s.num_workers
                for st in states):
            self.load_state_dict(states[s.rank])
            return None
        left, epoch = [], 0
        for st in states:
            saved = dataclasses.replace(s, rank=st["rank"], world_size=st["world_size"],
                                        num_workers=st["num_workers"])
            for worker, ws in enumerate(st["workers"]):
                start = ws["start"] if ws else None
                if start is None:  # this stream has not finished a block window: all of pass 0
                    plan = self.blocks.plan(0, worker, saved)
                    left += remaining_items(plan, [(0, 0)] * len(plan))
                    continue
                plan = start["plan"]
                if plan is None:
                    plan = self.blocks.plan(start["epoch"], worker, saved)
                left += remaining_items(plan, start["readers"])
                epoch = max(epoch, start["epoch"])
        workers = max(1, s.num_workers)
        plans = deal(left, workers * s.world_size, s.readers if s.shuffle else 1)
        self.worker_states = []
        for worker in range(workers):
            plan = plans[workers * s.rank + worker]
            start = {"epoch": epoch, "plan": plan, "window": 0,
                     "readers": [[0, 0]] * len(plan), "doc": 0, "offset": 0}
            self.worker_states.append({"worker": worker, "start": start, "window": 0,
                                       "emitted": 0})
        self.batches = 0
        before = sum(max(1, st["num_workers"]) for st in states)
        return (f"data: the rest of the current pass of {_n(before, 'stream')} on "
                f"{_n(len(states), 'process')} is dealt to {_n(workers * s.world_size, 'stream')} "
                f"on {_n(s.world_size, 'process')} ({_n(len(left), 'shard piece')}), then the "
                "next pass starts")

    def __iter__(self):
        batches = self._stream()
        if self.blocks.spec.num_workers:
            _close_at_exit(batches)
        return batches

    def _stream(self):
        workers = self.blocks.spec.num_workers
        self.blocks.resume_states = copy.deepcopy(self.worker_states)
        self.blocks.worker_offset = self.batches % max(1, workers)
        loader = torch.utils.data.DataLoader(
            self.blocks, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=_ignore_stop_signals)
        batches = iter(loader)  # the workers start here
        try:
            for batch in batches:
                state = batch.pop("_state")
                self.documents_seen += batch.pop("_documents")
                self.worker_states[state["worker"]] = state
                self.batches += 1
                yield batch
        finally:  # closed (loop.train does on every way out) or failed: no worker outlives it
            _stop_workers(batches)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C, and Slurm's SIGTERM before a time limit or preemption, reach the whole process
    # group; the main process handles them (finish the step, checkpoint, exit), and workers
    # that died on them would fail that last step. So workers outlive a plain SIGTERM, which
    # is how both torch (a worker that does not stop when told) and multiprocessing (daemon
    # children at interpreter exit, then joined: a hang) end them; `_stop_workers` ends them
    # instead, when the stream is closed or at exit (`_close_at_exit`). If the main process is
    # killed, they exit when they see their parent gone (torch's watchdog).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_workers(batches) -> None:
    """End a DataLoader iterator's workers now: torch's shutdown tells them to exit (an idle
    worker does at once), then those still running are killed, since the SIGTERM torch would
    send them is ignored. Nothing to do without workers."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own, also run by __del__
    if shutdown is not None:
        shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)


_OPEN_STREAMS = None  # BlockLoader streams with workers, not closed yet (a WeakSet, when needed)


def _close_at_exit(stream) -> None:
    """Close `stream` (which stops its workers) at interpreter exit if nothing closed it.

    The safety net for a way out that never closed it (an error whose traceback keeps its
    frame alive): at exit, multiprocessing SIGTERMs its daemon children and joins them, and
    ours ignore SIGTERM, so the process would hang there forever. The hook is registered with
    atexit after multiprocessing's own (imported first), so it runs before it, while torch's
    shutdown still works; and as a multiprocessing finalizer, which runs inside
    multiprocessing's exit function before it ends the children, whatever the order.
    """
    global _OPEN_STREAMS
    if _OPEN_STREAMS is None:
        import atexit
        import multiprocessing.util
        import weakref

        _OPEN_STREAMS = weakref.WeakSet()
        atexit.register(_close_open_streams)
        multiprocessing.util.Finalize(None, _close_open_streams, exitpriority=100)
    _OPEN_STREAMS.add(stream)


def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        _OPEN_STREAMS.discard(stream)
        try:
            stream.close()
        except Exception:  # torch's SIGCHLD handler calls a worker killed here a failure,
            pass           # once torch's own shutdown is off at exit: it is gone, as meant


# ----------------------------------------------------------------------------- entry points

def train_loader(cfg: DataConfig, tokenizer, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, source=None) -> BlockLoader:
    """This rank's training stream (held-out documents excluded when they are carved out)."""
    source = open_source(cfg, "train") if source is None else source
    carve = heldout_source(cfg) == "carve"
    spec = StreamSpec(rank=rank, world_size=world_size, num_workers=cfg.dataloader_num_workers,
                      seed=seed, shuffle=cfg.shuffle, window=cfg.shuffle_window,
                      shuffle_blocks=cfg.shuffle_buffer_blocks, readers=cfg.shuffle_readers,
                      select="train" if carve else "all",
                      heldout_percentage=cfg.validation_split_percentage)
    blocks = PackedBlocks(source, tokenizer, cfg.block_size, batch_size, spec, cfg.text_column)
    return BlockLoader(blocks, pin_memory=torch.cuda.is_available())


def validation_blocks(cfg: DataConfig, tokenizer, source=None, rank: int = 0,
                      world_size: int = 1) -> Optional[torch.Tensor]:
    """The whole held-out set as a [num_blocks, block_size] tensor, identical on every rank.

    Its tokens are those of the held-out documents in stream order (the shards in order, no
    shuffle), packed, and cut at --validation_split_tokens (carved or a dataset's split; files
    are used in full): the same set whatever the number of processes, so evaluation losses
    compare across runs, world sizes and resumes. The `world_size` processes (all of them call
    this, with their `rank`) read the shards side by side and share what they found
    (`_heldout_tokens`), so each reads about 1/world_size of what the set needs. None when there
    is no held-out set.
    """
    kind = heldout_source(cfg)
    if kind is None:
        return None
    if kind == "carve":
        source = open_source(cfg, "train") if source is None else source
    else:
        source = open_source(cfg, "validation")
    block = cfg.block_size
    need = None if kind == "files" else cfg.validation_split_tokens // block * block
    spec = StreamSpec(shuffle=False, infinite=False, window=cfg.shuffle_window,
                      select="heldout" if kind == "carve" else "all",
                      heldout_percentage=cfg.validation_split_percentage)
    blocks = PackedBlocks(source, tokenizer, block, 1, spec, cfg.text_column)
    tokens, read = _heldout_tokens(blocks, need, rank, world_size) if need != 0 else \
        (np.zeros(0, np.int32), 0)
    n = len(tokens) // block
    if not n:
        raise UsageError(f"the held-out set ({kind}) has fewer than --block_size "
                         f"{block} tokens (raise --validation_split_tokens or "
                         "--validation_split_percentage, or pass --validation_files)")
    if rank == 0:
        print(f"held-out set: {n:,} blocks of {block} tokens from {read} of "
              f"{_n(source.num_shards, 'shard')}, read by {_n(world_size, 'process')}")
    return torch.from_numpy(tokens[:n * block].reshape(n, block)).long()


def _heldout_tokens(blocks: PackedBlocks, need: Optional[int], rank: int,
                    world_size: int) -> tuple[np.ndarray, int]:
    """The first `need` tokens (all if None) of the documents `blocks` selects, in order over
    its source's shards in order, and how many shards were read, by `world_size` processes.

    In rounds of one shard per process (rank r reads shards r, r + world_size, ...); after each
    round the processes exchange how many tokens each shard held and stop as soon as the shards
    so far hold `need`. Then each sends the part of its shards that the set uses, and all put
    them together in shard order: the sequential result, read in parallel.
    """
    shards = blocks.source.num_shards
    mine: dict[int, np.ndarray] = {}
    sizes: list[int] = []  # tokens of each shard read so far, in shard order
    for first in range(0, shards, world_size):
        shard, count = first + rank, None
        if shard < shards:
            # No shard contributes more than what the earlier rounds left to find.
            cap = None if need is None else need - sum(sizes)
            mine[shard] = _shard_tokens(blocks, shard, cap)
            count = len(mine[shard])
        sizes += [c for c in _all_gather(count, world_size) if c is not None]
        if need is not None and sum(sizes) >= need:
            break
    used = {}
    for shard, tokens in mine.items():
        before = sum(sizes[:shard])
        used[shard] = tokens if need is None else tokens[:max(0, need - before)]
    parts = {}
    for part in _all_gather(used, world_size):
        parts.update(part)
    return (np.concatenate([parts[g] for g in sorted(parts)]) if parts else
            np.zeros(0, np.int32)), len(sizes)


def _shard_tokens(blocks: PackedBlocks, shard: int, cap: Optional[int]) -> np.ndarray:
    """The tokens of the selected documents of one shard, in order; reading stops once there
    are `cap` (a long single-file shard is not read to its end for a small set)."""
    out, have = [], 0
    with contextlib.closing(blocks._open_item([shard, 0, 1], 0)) as batches:
        for texts in batches:
            texts = [t for t in texts if blocks._keep(t)]
            for lo in range(0, len(texts), TOKENIZE_CHUNK):
                encoded = encode(blocks.tokenizer, texts[lo:lo + TOKENIZE_CHUNK])
                out += encoded
                have += sum(len(t) for t in encoded)
                if cap is not None and have >= cap:
                    return np.concatenate(out)
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def _all_gather(obj, world_size: int) -> list:
    """`obj` from every process of the default process group, in rank order ([obj] on one)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out
