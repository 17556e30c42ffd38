"""Streaming text -> tokens -> packed blocks, sharded by rank and worker, resumable exactly.

    python bench/data_throughput.py --dataset_name data/demo_corpus --tokenizer_name data/demo_tokenizer

Sources are `datasets` streaming `IterableDataset`s: a Hub dataset by name (parquet, read in row
groups), a local folder laid out like one, or local `.txt`/`.jsonl`/`.parquet` globs. Every rank
and every DataLoader worker gets its own shards through `datasets.distributed.split_dataset_by_node`
(applied twice: ranks, then workers), so the streams are disjoint and together cover the data.

Ordering is ours, not `IterableDataset.shuffle`'s, because a shuffle buffer cannot be resumed
without storing its contents. Each epoch the shard order is permuted (`set_epoch` with a key
derived from the seed and the epoch); each worker reads its shards as `shuffle_readers` groups
side by side, so documents come from that many places in the dataset at once; documents are
taken in windows of `shuffle_window` that are permuted by a generator seeded from (seed, epoch,
window, rank, worker); they are packed into blocks, and the blocks are emitted in windows of
`shuffle_buffer_blocks`, each permuted, so that a micro-batch holds pieces of many documents.
The position of the next block is therefore fully described by where its block window starts
(epoch, document window, the readers' datasets states at that window's start, document, token
offset), the block window's number and the blocks of it already emitted: a resume loads those
datasets states (which seek by shard, i.e. parquet row group), re-reads one document window,
re-packs at most two block windows and drops what was already used. Nothing is carried in the
state but these numbers.

When a worker's shards run out it starts its next epoch on its own (new shard order and window
permutation), so ranks with uneven data never wait for each other and nobody hangs; the run's
length is set by `max_steps`, not by the data.
"""

from __future__ import annotations

import copy
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

from .config import DataConfig, UsageError, first_line

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKENIZE_CHUNK = 128  # documents per tokenizer call: large enough to amortise, small for latency


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
    # datasets permutes shard order with default_rng(key) and skips it for key 0.
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=4).digest(),
                          "little") | 1


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

    def _readers(self, worker: int) -> list:
        """This worker's share of the source, as the streams it reads side by side."""
        from datasets.distributed import split_dataset_by_node

        s = self.spec
        workers = max(1, s.num_workers)
        # Whole shards when there are enough for everyone; else every k-th document.
        strategy = "shards" if self.source.num_shards >= s.world_size * workers else "examples"
        ds = split_dataset_by_node(self.source, s.rank, s.world_size, strategy=strategy)
        ds = split_dataset_by_node(ds, worker, workers, strategy=strategy)
        readers = min(s.readers, ds.num_shards) if s.shuffle and strategy == "shards" else 1
        if readers <= 1:
            return [ds]
        # Contiguous groups of shards: each reader walks its own part of the dataset, so a
        # window holds documents from `readers` places rather than from one stretch of it.
        return [split_dataset_by_node(ds, j, readers, strategy="shards") for j in range(readers)]

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
        is the readers' `datasets` states at its start.
        """
        s = self.spec
        epoch = resume["epoch"] if resume else 0
        while True:
            readers = self._readers(worker)
            if s.shuffle:
                for ds in readers:
                    ds.set_epoch(_epoch_key(s.seed, epoch))
            window, first_doc, window_state = 0, 0, None
            if resume:
                window, first_doc, window_state = resume["window"], resume["doc"], resume["hf_state"]
                for ds, state in zip(readers, window_state or []):
                    ds.load_state_dict(state)
                resume = None
            from_start, found = window == 0 and first_doc == 0, False
            per_reader = -(-s.window // len(readers))
            streams = [ds.iter(batch_size=per_reader) for ds in readers]
            live = list(range(len(streams)))
            try:
                while live:
                    texts = []
                    for i in list(live):
                        batch = next(streams[i], None)
                        if batch is None:
                            live.remove(i)
                        else:
                            texts += batch[self.text_column]
                    if not live and not texts:
                        break
                    texts = [t for t in texts if self._keep(t)]
                    found = found or bool(texts)
                    if s.shuffle:
                        rng = np.random.default_rng([s.seed, epoch, window, s.rank, worker])
                        texts = [texts[i] for i in rng.permutation(len(texts))]
                    pos = {"epoch": epoch, "window": window, "hf_state": window_state}
                    for lo in range(first_doc, len(texts), TOKENIZE_CHUNK):
                        chunk = texts[lo:lo + TOKENIZE_CHUNK]
                        for j, tokens in enumerate(encode(self.tokenizer, chunk)):
                            yield {**pos, "doc": lo + j}, tokens
                    first_doc, window = 0, window + 1
                    window_state = [copy.deepcopy(ds.state_dict()) for ds in readers]
            finally:
                for stream in streams:
                    stream.close()
            if not s.infinite:
                return
            if from_start and not found:  # cycling an empty stream would spin forever
                raise UsageError(f"rank {s.rank} worker {worker} got no documents (fewer "
                                 "documents than ranks x workers? lower "
                                 "--dataloader_num_workers or add data)")
            epoch += 1

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

    def _meta(self) -> dict:
        s = self.blocks.spec
        return {"rank": s.rank, "world_size": s.world_size, "num_workers": s.num_workers,
                "block_size": self.blocks.block_size, "batch_size": self.blocks.batch_size,
                "seed": s.seed, "shuffle": s.shuffle, "window": s.window,
                "shuffle_blocks": s.shuffle_blocks, "readers": s.readers}

    def state_dict(self) -> dict:
        return {**self._meta(), "batches": self.batches,
                "workers": copy.deepcopy(self.worker_states)}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._meta().items():
            if state.get(key) != value:
                raise UsageError(f"the checkpoint's data state has {key}={state.get(key)} but "
                                 f"this run has {key}={value} (resume with the same {key})")
        self.batches = state["batches"]
        self.worker_states = copy.deepcopy(state["workers"])

    def __iter__(self):
        workers = self.blocks.spec.num_workers
        self.blocks.resume_states = copy.deepcopy(self.worker_states)
        self.blocks.worker_offset = self.batches % max(1, workers)
        loader = torch.utils.data.DataLoader(
            self.blocks, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=_ignore_sigint)
        for batch in loader:
            state = batch.pop("_state")
            self.documents_seen += batch.pop("_documents")
            self.worker_states[state["worker"]] = state
            self.batches += 1
            yield batch


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process handles it (finish the step,
    # checkpoint, exit), and workers that died on it would fail that last step.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def validation_blocks(cfg: DataConfig, tokenizer, source=None) -> Optional[torch.Tensor]:
    """The whole held-out set as a [num_blocks, block_size] tensor, identical on every rank.

    Read in stream order (no shuffle) so it never changes between runs; None when there is none.
    """
    kind = heldout_source(cfg)
    if kind is None:
        return None
    if kind == "carve":
        source = open_source(cfg, "train") if source is None else source
    else:
        source = open_source(cfg, "validation")
    limit = None if kind == "files" else cfg.validation_split_tokens // cfg.block_size
    spec = StreamSpec(shuffle=False, infinite=False, window=cfg.shuffle_window,
                      select="heldout" if kind == "carve" else "all",
                      heldout_percentage=cfg.validation_split_percentage)
    blocks = PackedBlocks(source, tokenizer, cfg.block_size, 1, spec, cfg.text_column)
    out = []
    for block, _, _ in blocks.blocks(0):
        if limit is not None and len(out) >= limit:
            break
        out.append(block)
    if not out:
        raise UsageError(f"the held-out set ({kind}) has fewer than --block_size "
                         f"{cfg.block_size} tokens (raise --validation_split_tokens or "
                         "--validation_split_percentage, or pass --validation_files)")
    return torch.from_numpy(np.stack(out)).long()
