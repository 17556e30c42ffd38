"""Data pipeline: packing, sharding, held-out split, exact resume, errors."""

import json
import subprocess
import sys

import numpy as np
import torch
import pytest

from clm.config import DataConfig, UsageError
from clm.data import (PackedBlocks, StreamSpec, encode, heldout_source, open_source, pack,
                      train_loader, validation_blocks)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def doc_index(tokenizer, tokens) -> int:
    text = tokenizer.decode(tokens[:-1])
    assert text.startswith("doc"), text
    return int(text.split()[0][3:])


def epoch_docs(source, tokenizer, **spec) -> list[int]:
    """Document indices one (rank, worker) stream reads in one epoch, in order."""
    worker = spec.pop("worker", 0)
    blocks = PackedBlocks(source, tokenizer, 16, 1, StreamSpec(infinite=False, **spec))
    return [doc_index(tokenizer, t) for _, t in blocks.documents(worker)]


# ---------------------------------------------------------------- packing

def test_pack_loses_and_duplicates_nothing():
    rng = np.random.default_rng(0)
    eos = 0
    docs = [np.append(rng.integers(1, 50, size=n), eos).astype(np.int32)
            for n in rng.integers(0, 40, size=50)]
    out = list(pack(((({"doc": i}), d) for i, d in enumerate(docs)), block_size=16))
    stream = np.concatenate(docs)
    blocks = [b for b, _, _ in out]
    assert all(len(b) == 16 for b in blocks)
    assert len(blocks) == len(stream) // 16
    np.testing.assert_array_equal(np.concatenate(blocks), stream[:len(blocks) * 16])
    assert (np.concatenate(blocks) == eos).sum() == (stream[:len(blocks) * 16] == eos).sum()
    # each position names the next token: re-packing from it gives the remaining blocks
    k = 7
    pos = out[k - 1][1]
    rest = pack(((({"doc": i}), d) for i, d in enumerate(docs) if i >= pos["doc"]), 16,
                skip=pos["offset"])
    np.testing.assert_array_equal(np.concatenate([b for b, _, _ in rest]),
                                  np.concatenate(blocks[k:]))


def test_blocks_hold_documents_joined_by_eos(corpus_dir, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=64, shuffle=False,
                     dataloader_num_workers=0, validation_split_percentage=0)
    batch = next(iter(train_loader(cfg, tokenizer, batch_size=4, seed=0)))
    ids = batch["input_ids"]
    assert ids.shape == (4, 64) and (batch["labels"] == ids).all()
    assert batch["attention_mask"].all()
    text = tokenizer.decode(ids.flatten().tolist())
    assert text.startswith("doc0 ") and "<|endoftext|>doc1 " in text


class PythonPathTokenizer:
    """The tokenizer without `backend_tokenizer`, so `encode` takes its `tokenizer(...)` path."""

    def __init__(self, tokenizer):
        self.inner, self.eos_token_id = tokenizer, tokenizer.eos_token_id

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_special_token_text_in_a_document_is_plain_text(tokenizer, corpus_docs):
    eos = tokenizer.eos_token_id
    doc = "doc7 a page that quotes <|endoftext|> and ends with <|endoftext|>"
    assert tokenizer(doc, add_special_tokens=False)["input_ids"].count(eos) == 2, \
        "by default the tokenizer turns this text into EOS ids"
    for tok in (tokenizer, PythonPathTokenizer(tokenizer)):
        (ids,) = encode(tok, [doc])
        assert ids[-1] == eos and eos not in ids[:-1].tolist()
        assert tokenizer.decode(ids[:-1]) == doc
        # text without special tokens encodes exactly as before
        for got, text in zip(encode(tok, corpus_docs[:50]), corpus_docs[:50]):
            assert got.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    assert tokenizer.backend_tokenizer.encode_special_tokens is False, "the flag is restored"


def test_packed_stream_has_eos_only_between_documents(tmp_path, tokenizer, corpus_docs):
    docs = [d if i % 3 else d.replace(" ", " <|endoftext|> ", 1)
            for i, d in enumerate(corpus_docs[:30])]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    source = open_source(DataConfig(train_files=[str(path)]))
    blocks = PackedBlocks(source, tokenizer, 16, 1, StreamSpec(shuffle=False, infinite=False))
    stream = np.concatenate([b for b, _, _ in blocks.blocks(0)]).tolist()
    ends = [i for i, t in enumerate(stream) if t == tokenizer.eos_token_id]
    assert len(ends) >= len(docs) - 1  # blocks are full: at most the last document is cut
    starts = [0] + [e + 1 for e in ends]
    assert [tokenizer.decode(stream[a:b]) for a, b in zip(starts, ends)] == docs[:len(ends)]


# ---------------------------------------------------------------- sharding

@pytest.mark.parametrize("kind,readers", [("parquet_row_groups", 1), ("parquet_row_groups", 3),
                                          ("single_jsonl", 4)])
def test_ranks_and_workers_are_disjoint_and_complete(corpus_dir, jsonl_file, tokenizer, kind,
                                                     readers):
    if kind == "parquet_row_groups":
        cfg = DataConfig(dataset_name=str(corpus_dir))
    else:  # one file: one shard, so datasets splits by document instead
        cfg = DataConfig(train_files=[str(jsonl_file)])
    source = open_source(cfg)
    seen = []
    for rank in range(2):
        for worker in range(2):
            seen.append(epoch_docs(source, tokenizer, rank=rank, world_size=2, num_workers=2,
                                   worker=worker, seed=1, readers=readers, window=8))
    flat = [d for part in seen for d in part]
    assert all(seen), "every rank and worker gets data"
    assert len(flat) == len(set(flat)), "no document is read twice"
    assert set(flat) == set(range(240)), "together the streams cover the data"


def test_fewer_shards_than_streams_is_told_once_at_start(tmp_path, jsonl_file, corpus_dir,
                                                        tokenizer_dir, toy_config_dir, capsys):
    from clm.data import few_shards_warning
    from helpers import run, toy_args

    assert few_shards_warning(12, 2, 6) is None and few_shards_warning(12, 12, 0) is None
    assert few_shards_warning(3, 1, 4) == (
        "warning: the training data has 3 shards for 4 streams (1 process x 4 streams each), "
        "so every stream decodes all of it and keeps 1 document in 4 (pass "
        "--dataloader_num_workers 3 or split the data into at least 4 files or parquet row "
        "groups)")
    assert "--dataloader_num_workers" not in few_shards_warning(3, 4, 0)
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "out", max_steps=1,
                 eval_steps=1, train_files=jsonl_file, dataloader_num_workers=2))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("warning:")] == [
        few_shards_warning(1, 1, 2)]
    assert any(line.startswith("held-out set:") for line in out)


def epochs_of_stream(source, tokenizer, epochs: int, **spec) -> list[list[int]]:
    """Document indices of the first `epochs` epochs of one endless stream, by epoch."""
    blocks = PackedBlocks(source, tokenizer, 16, 1, StreamSpec(infinite=True, **spec))
    out = [[]]
    for pos, tokens in blocks.documents(0):
        if pos["epoch"] != len(out) - 1:  # the stream ran past the end of the data
            assert pos["epoch"] == len(out), "epochs are consecutive"
            if len(out) == epochs:
                break
            out.append([])
        out[-1].append(doc_index(tokenizer, tokens))
    assert len(out) == epochs, "the stream must run past the end of the data"
    return out


@pytest.mark.parametrize("readers", [1, 3])
def test_shuffle_changes_order_per_epoch_and_seed(corpus_dir, tokenizer, readers):
    source = open_source(DataConfig(dataset_name=str(corpus_dir)))
    plain = epoch_docs(source, tokenizer, shuffle=False)
    assert plain == list(range(240))
    first, second = epochs_of_stream(source, tokenizer, 2, seed=1, window=50, readers=readers)
    assert sorted(first) == sorted(second) == plain, "each epoch holds every document once"
    assert first != plain and second != first, "a new order every epoch"
    assert first == epoch_docs(source, tokenizer, seed=1, window=50, readers=readers)
    again = epochs_of_stream(source, tokenizer, 2, seed=1, window=50, readers=readers)
    assert again == [first, second], "the orders are the seed's"
    other = epochs_of_stream(source, tokenizer, 2, seed=2, window=50, readers=readers)
    assert other[0] != first and other[1] != second


def test_readers_spread_a_window_over_the_dataset(corpus_dir, tokenizer):
    """The corpus is stored in document order; one reader's first window is one stretch of
    it, several readers' first window comes from that many places."""
    source = open_source(DataConfig(dataset_name=str(corpus_dir)))
    first = {r: epoch_docs(source, tokenizer, seed=1, window=24, readers=r)[:24] for r in (1, 6)}
    spread = {r: len({d // 20 for d in docs}) for r, docs in first.items()}  # 20 per row group
    assert spread[1] <= 2 and spread[6] >= 6, first


def block_stream(cfg, tokenizer, batches):
    loader = train_loader(cfg, tokenizer, batch_size=4, seed=2)
    blocks = [row.tolist() for batch in take(loader, batches) for row in batch]
    return blocks, loader.documents_seen / loader.batches


def test_block_shuffle_permutes_windows_and_mixes_documents(corpus_dir, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=16, shuffle_buffer_blocks=1,
                     dataloader_num_workers=0, validation_split_percentage=0)
    plain, plain_docs = block_stream(cfg, tokenizer, 40)
    cfg.shuffle_buffer_blocks = 32
    mixed, mixed_docs = block_stream(cfg, tokenizer, 40)
    assert mixed != plain
    for lo in range(0, 160, 32):  # the same blocks, each window of 32 permuted in itself
        assert sorted(mixed[lo:lo + 32]) == sorted(plain[lo:lo + 32])
    # consecutive 16-token blocks share documents; drawn from a window they rarely do
    assert mixed_docs > 1.5 * plain_docs, (plain_docs, mixed_docs)


@pytest.mark.parametrize("option", ["--shuffle_buffer_blocks", "--shuffle_readers"])
def test_shuffle_sizes_below_one_are_one_line_errors(tmp_path, option):
    proc = subprocess.run([sys.executable, "train_clm.py", "--output_dir", str(tmp_path / "o"),
                           "--train_files", "x.txt", option, "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} 0 must be >= 1"), lines
    assert not (tmp_path / "o").exists()


def test_two_process_torchrun_sharding(tmp_path, corpus_dir, tokenizer_dir):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_data_check.py"), str(corpus_dir), str(tokenizer_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["dist_world_size"] == 2
    a, b = result["docs"]
    assert a and b and not set(a) & set(b)
    assert sorted(a + b) == list(range(240))
    assert result["epoch_tokens"][0] != result["epoch_tokens"][1], "the ranks' data is uneven"
    assert min(result["epochs"]) >= 1, "both ranks ran past their data into a new epoch"
    assert result["steps_done"] == [result["steps"], result["steps"]]


# ---------------------------------------------------------------- held-out set

def test_heldout_and_training_share_no_document(corpus_dir, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), validation_split_percentage=20, block_size=16)
    assert heldout_source(cfg) == "carve"
    source = open_source(cfg)
    train = epoch_docs(source, tokenizer, select="train", heldout_percentage=20)
    held = epoch_docs(source, tokenizer, select="heldout", heldout_percentage=20)
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(range(240))
    assert 20 < len(held) < 80  # about 20% of 240
    val = validation_blocks(cfg, tokenizer)
    assert val.shape[1] == 16 and len(val) > 10
    assert (val == validation_blocks(cfg, tokenizer)).all(), "held-out set is deterministic"
    text = tokenizer.decode(val.flatten().tolist())
    held_names = {f"doc{i} " for i in held}
    names = {p.split()[0] + " " for p in text.split("<|endoftext|>")[1:-1] if p}
    assert names and names <= held_names


def test_validation_files_are_used_in_full(corpus_dir, jsonl_file, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), validation_files=[str(jsonl_file)],
                     block_size=32, validation_split_tokens=64)
    assert heldout_source(cfg) == "files"
    val = validation_blocks(cfg, tokenizer)
    total = sum(len(tokenizer(d)["input_ids"]) + 1 for d in
                [json.loads(line)["text"] for line in jsonl_file.read_text().splitlines()])
    assert len(val) == total // 32


# ---------------------------------------------------------------- exact resume

def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch["input_ids"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers,shuffle_blocks", [(0, 1), (0, 12), (2, 12)])
def test_state_round_trip_continues_exactly(corpus_dir, tokenizer, workers, shuffle_blocks):
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=64, shuffle_window=16,
                     shuffle_buffer_blocks=shuffle_blocks, dataloader_num_workers=workers,
                     validation_split_percentage=10)

    def loader():
        return train_loader(cfg, tokenizer, batch_size=4, seed=3)

    total = 150  # more than one epoch of this corpus: the resume also crosses epochs
    reference = take(loader(), total)
    for k in (1, 37, 125):
        first = loader()
        head = take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON file
        resumed = loader()
        resumed.load_state_dict(state)
        tail = take(resumed, total - k)
        for got, want in zip(head + tail, reference):
            assert (got == want).all()
    epochs = {w["start"]["epoch"] for w in first.state_dict()["workers"] if w and w["start"]}
    assert max(epochs) >= 1, "the test must cross an epoch boundary"


def test_state_refuses_other_world_size(corpus_dir, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=64, dataloader_num_workers=0)
    loader = train_loader(cfg, tokenizer, batch_size=2, seed=0)
    take(loader, 2)
    other = train_loader(cfg, tokenizer, batch_size=2, seed=0, rank=0, world_size=2)
    with pytest.raises(UsageError, match="world_size"):
        other.load_state_dict(loader.state_dict())


# ---------------------------------------------------------------- errors

def test_missing_column_lists_columns(corpus_dir):
    with pytest.raises(UsageError, match=r"--text_column 'body' not found.*\['id', 'text'\]"):
        open_source(DataConfig(dataset_name=str(corpus_dir), text_column="body"))


def test_empty_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="holds no documents"):
        open_source(DataConfig(train_files=[str(tmp_path / "empty.jsonl")]))


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(UsageError, match="matches no file"):
        open_source(DataConfig(train_files=[str(tmp_path / "nope" / "*.txt")]))
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(UsageError, match="unsupported file type '.csv'"):
        open_source(DataConfig(train_files=[str(tmp_path / "a.csv")]))


def test_cli_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clm.tokenizer", "--train_files",
                           str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "tok")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --train_files") and "(" in lines[0]
    assert not (tmp_path / "tok").exists()


def test_bad_option_values():
    with pytest.raises(UsageError, match="--block_size"):
        DataConfig(block_size=1)
    with pytest.raises(UsageError, match="--validation_split_percentage"):
        DataConfig(validation_split_percentage=100)


@pytest.mark.parametrize("readers", [1, 3])
def test_resume_reads_one_window_not_the_consumed_data(corpus_dir, tokenizer, monkeypatch,
                                                      readers):
    from datasets.packaged_modules.parquet.parquet import Parquet

    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=64, shuffle_window=15,
                     shuffle_buffer_blocks=4, shuffle_readers=readers, dataloader_num_workers=0,
                     validation_split_percentage=0)
    rows = []
    original = Parquet._generate_tables

    def counting(self, *args, **kwargs):
        for key, table in original(self, *args, **kwargs):
            rows.append(len(table))
            yield key, table

    # before the source is opened: it binds the reading method then
    monkeypatch.setattr(Parquet, "_generate_tables", counting)
    source = open_source(cfg)
    read = []
    for consumed_batches in (20, 60):
        rows.clear()
        first = train_loader(cfg, tokenizer, batch_size=4, seed=0, source=source)
        take(first, consumed_batches)
        consumed = sum(rows)
        state = first.state_dict()
        assert state["workers"][0]["start"]["epoch"] == 0
        rows.clear()
        resumed = train_loader(cfg, tokenizer, batch_size=4, seed=0, source=source)
        resumed.load_state_dict(state)
        take(resumed, 1)
        read.append((consumed, sum(rows)))
    (_, early), (late_consumed, late) = read
    # seeks by row group (20 rows here) in each reader: a resume reads a few row groups per
    # reader, the same however much was consumed
    bound = 20 * (3 * readers + 1)
    assert 0 < early <= bound and 0 < late <= bound < late_consumed, read


def test_streaming_off_and_text_files_read_the_same_documents(corpus_dir, tmp_path, tokenizer,
                                                              corpus_docs):
    on = epoch_docs(open_source(DataConfig(dataset_name=str(corpus_dir))), tokenizer,
                    shuffle=False)
    off = epoch_docs(open_source(DataConfig(dataset_name=str(corpus_dir), streaming=False)),
                     tokenizer, shuffle=False)
    assert on == off == list(range(240))
    for i in range(3):  # .txt: one document per file, newlines kept
        (tmp_path / f"{i}.txt").write_text(corpus_docs[i] + "\nsecond line")
    source = open_source(DataConfig(train_files=[str(tmp_path / "*.txt")]))
    assert sorted(epoch_docs(source, tokenizer, shuffle=False)) == [0, 1, 2]


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(UsageError, match=r"could not load --dataset_name Skylion007/openwebtext"):
        open_source(DataConfig())


# ---------------------------------------------------------------- another number of processes

def consume(loader, batches: int) -> set:
    """Train on `batches` micro-batches as BlockLoader hands them out (round-robin over the
    workers' streams); returns the (worker, epoch, window, doc) of every document a consumed
    block holds a piece of."""
    workers = max(1, loader.blocks.spec.num_workers)
    streams = [loader.blocks.blocks(w, loader.worker_states[w]) for w in range(workers)]
    seen = set()
    for n in range(batches):
        w = (loader.batches + n) % workers
        for _ in range(loader.blocks.batch_size):
            _, names, state = next(streams[w])
            seen |= {(w, *name) for name in names}
        loader.worker_states[w] = {"worker": w, **state}
    loader.batches += batches
    return seen


def named_documents(blocks, worker, tokenizer, resume=None, epochs=1):
    """{(epoch, window, doc): document index} of a stream's first `epochs` passes."""
    out = {}
    for pos, tokens in blocks.documents(worker, resume):
        if pos["epoch"] >= (resume["epoch"] if resume else 0) + epochs:
            break
        out[(pos["epoch"], pos["window"], pos["doc"])] = doc_index(tokenizer, tokens)
    return out


@pytest.mark.parametrize("kind,before,after", [
    ("row_groups", (2, 0), (1, 0)), ("row_groups", (1, 0), (2, 0)),
    ("row_groups", (2, 2), (3, 1)), ("row_groups", (1, 0), (5, 1)),
    ("one_file", (2, 0), (1, 0)), ("one_file", (1, 0), (3, 0))])
def test_restore_on_another_layout_skips_nothing_and_repeats_a_bounded_few(
        corpus_dir, jsonl_file, tokenizer, kind, before, after):
    """A data state saved by N ranks x W workers continues on M x V: the rest of the pass is
    read exactly once (no document skipped), and what is read again is bounded by one
    document window plus one block window per saved stream (the README's statement)."""
    window, size, block = 15, 4, 16
    where = {"dataset_name": str(corpus_dir)} if kind == "row_groups" else \
        {"train_files": [str(jsonl_file)]}  # one shard: streams split it by document
    cfg = lambda workers: DataConfig(  # noqa: E731
        **where, block_size=block, shuffle_window=window,
        shuffle_buffer_blocks=size, shuffle_readers=3, dataloader_num_workers=workers,
        validation_split_percentage=0)
    source = open_source(cfg(0))
    (n, w), (m, v) = before, after
    old = [train_loader(cfg(w), tokenizer, 2, seed=5, rank=r, world_size=n, source=source)
           for r in range(n)]
    trained = set()
    for r, loader in enumerate(old):
        names = consume(loader, 100 + 37 * r)  # ranks stop at different places
        assert {name[1] for name in names} == {0}, "the test stays within the first pass"
        for worker in range(max(1, w)):
            ids = named_documents(loader.blocks, worker, tokenizer)
            trained |= {ids[name[1:]] for name in names if name[0] == worker}
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]  # as saved

    new = [train_loader(cfg(v), tokenizer, 2, seed=5, rank=r, world_size=m, source=source)
           for r in range(m)]
    lines = {loader.restore(states) for loader in new}
    assert len(lines) == 1 and f"is dealt to {m * max(1, v)} stream" in lines.pop()
    rest = []
    for loader in new:
        for worker, state in enumerate(loader.worker_states):
            assert state["start"]["epoch"] == 0 and state["start"]["plan"] is not None
            rest += named_documents(loader.blocks, worker, tokenizer, state["start"]).values()
    assert rest and len(rest) == len(set(rest)), "the rest of the pass is dealt without overlap"
    assert trained | set(rest) == set(range(240)), "no document is skipped"
    again = trained & set(rest)
    streams = sum(max(1, s["num_workers"]) for s in states)
    bound = streams * (window + size * block)  # a block holds pieces of <= block documents
    print(f"{before} -> {after}: trained on {len(trained)} documents, {len(rest)} left, "
          f"{len(again)} read again (bound {bound})")
    assert len(again) <= bound, (len(again), bound)
    assert len(again) < len(trained) / 2, "most of what was trained on is not read again"
    # then every new stream starts the next pass, which the new streams share as usual
    for loader in new:
        for worker, state in enumerate(loader.worker_states):
            docs = loader.blocks.documents(worker, state["start"])
            assert any(pos["epoch"] == 1 for pos, _ in docs)


def test_restore_with_the_same_layout_is_exact(corpus_dir, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=64, shuffle_window=16,
                     shuffle_buffer_blocks=4, dataloader_num_workers=0)
    loaders = [train_loader(cfg, tokenizer, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for r, loader in enumerate(loaders):
        take(loader, 5 + r)
    states = [loader.state_dict() for loader in loaders]
    for r in range(2):
        resumed = train_loader(cfg, tokenizer, 2, seed=0, rank=r, world_size=2)
        assert resumed.restore(states) is None
        assert resumed.state_dict() == states[r]


def test_exact_resume_within_a_dealt_pass(corpus_dir, tokenizer):
    """A run moved to another layout and stopped again before the dealt pass ends resumes
    exactly on the same layout, and its state can be dealt once more."""
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=32, shuffle_window=16,
                     shuffle_buffer_blocks=4, dataloader_num_workers=0,
                     validation_split_percentage=0)
    old = [train_loader(cfg, tokenizer, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for loader in old:
        take(loader, 20)
    moved = train_loader(cfg, tokenizer, 2, seed=0)
    assert moved.restore([loader.state_dict() for loader in old])
    take(moved, 15)
    state = json.loads(json.dumps(moved.state_dict()))
    assert state["workers"][0]["start"]["plan"], "still in the dealt pass"
    reference = take(moved, 40)  # into the next pass
    again = train_loader(cfg, tokenizer, 2, seed=0)
    assert again.restore([state]) is None
    for a, b in zip(take(again, 40), reference):
        assert torch.equal(a, b)
    # and from the middle of the dealt pass to two processes again
    twice = [train_loader(cfg, tokenizer, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    assert all(loader.restore([state]) for loader in twice)
    plans = [{tuple(i) for reader in lo.worker_states[0]["start"]["plan"] for i in reader}
             for lo in twice]
    assert plans[0] and plans[1] and not plans[0] & plans[1]
