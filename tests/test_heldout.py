"""The held-out set: the same blocks whatever the number of processes, read in parallel."""

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clm import data
from clm.config import DataConfig, UsageError
from clm.data import PackedBlocks, StreamSpec, heldout_source, open_source, validation_blocks
from conftest import make_documents, write_parquet_corpus
from helpers import torchrun


def sequential(cfg, tokenizer):
    """The held-out set as one stream reads it (the code before the parallel read): the
    selected documents of the shards in order, packed, cut at --validation_split_tokens."""
    kind = heldout_source(cfg)
    source = open_source(cfg, "train" if kind == "carve" else "validation")
    limit = None if kind == "files" else cfg.validation_split_tokens // cfg.block_size
    spec = StreamSpec(shuffle=False, infinite=False, window=cfg.shuffle_window,
                      select="heldout" if kind == "carve" else "all",
                      heldout_percentage=cfg.validation_split_percentage)
    out = []
    for block, _, _ in PackedBlocks(source, tokenizer, cfg.block_size, 1, spec).blocks(0):
        if limit is not None and len(out) >= limit:
            break
        out.append(block)
    return torch.from_numpy(np.stack(out)).long()


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory):
    """A dataset folder with its own validation split of 16 row groups."""
    root = write_parquet_corpus(tmp_path_factory.mktemp("split"), make_documents(120, seed=1))
    docs = make_documents(80, seed=2)
    pq.write_table(pa.table({"text": docs}),
                   root / "plain_text" / "validation-00000-of-00001.parquet", row_group_size=5)
    return root


@pytest.fixture
def opened(monkeypatch):
    """The shards (work items) opened by PackedBlocks in this process, in order."""
    shards = []
    open_item = PackedBlocks._open_item

    def counting(self, item, taken):
        shards.append(item[0])
        return open_item(self, item, taken)

    monkeypatch.setattr(PackedBlocks, "_open_item", counting)
    return shards


def cases(corpus_dir, split_corpus, jsonl_file):
    """DataConfig arguments: a carve cut early and in full, a split cut early, files in full."""
    carve = {"dataset_name": str(corpus_dir), "validation_split_percentage": 20,
             "block_size": 16}
    return {"carve_early": {**carve, "validation_split_tokens": 1900},
            "carve_all": {**carve, "validation_split_tokens": 10**9},
            "split_early": {"dataset_name": str(split_corpus), "block_size": 16,
                            "validation_split_tokens": 1600},
            "files": {"dataset_name": str(corpus_dir), "validation_files": [str(jsonl_file)],
                      "block_size": 16}}


def test_one_process_reads_the_sequential_set_and_stops_when_it_has_it(
        corpus_dir, split_corpus, jsonl_file, tokenizer, opened, capsys):
    for name, kwargs in cases(corpus_dir, split_corpus, jsonl_file).items():
        cfg = DataConfig(**kwargs)
        opened.clear()
        val = validation_blocks(cfg, tokenizer)
        read = sorted(opened)
        assert torch.equal(val, sequential(cfg, tokenizer)), name
        shards = open_source(cfg, "train" if name.startswith("carve") else "validation")
        if name.endswith("early"):
            assert read == list(range(len(read))) and 1 < len(read) < shards.num_shards, name
        else:
            assert read == list(range(shards.num_shards)), name
    assert capsys.readouterr().out.count("read by 1 process\n") == 4


def test_a_long_single_file_is_read_only_as_far_as_the_set_needs(
        jsonl_file, tokenizer, monkeypatch):
    cfg = DataConfig(train_files=[str(jsonl_file)], validation_split_percentage=20,
                     block_size=16, validation_split_tokens=320)
    monkeypatch.setattr(data, "READ_BATCH", 8)  # 240 documents in the one shard
    seen = []
    keep = PackedBlocks._keep
    monkeypatch.setattr(PackedBlocks, "_keep", lambda self, t: seen.append(t) or keep(self, t))
    val = validation_blocks(cfg, tokenizer)
    assert len(val) == 20 and len(seen) < 120, "stops in the shard once it holds the set"
    assert torch.equal(val, sequential(cfg, tokenizer))


def test_no_tokens_asked_is_a_usage_error(corpus_dir, tokenizer):
    cfg = DataConfig(dataset_name=str(corpus_dir), block_size=16, validation_split_tokens=8)
    with pytest.raises(UsageError, match="fewer than --block_size 16 tokens"):
        validation_blocks(cfg, tokenizer)


def test_two_processes_build_the_same_set_reading_half_the_shards_each(
        tmp_path, corpus_dir, split_corpus, jsonl_file, tokenizer_dir, tokenizer, opened):
    """Under torchrun, each rank reads every other shard of those the set needs and all end
    with the tensor one process builds alone (compared by hash)."""
    named = cases(corpus_dir, split_corpus, jsonl_file)
    (tmp_path / "cases.json").write_text(json.dumps(list(named.values())))
    printed = torchrun(tmp_path, "tests/dist_heldout_check.py",
                       [tokenizer_dir, tmp_path / "cases.json", tmp_path / "out.json"])
    got = json.loads((tmp_path / "out.json").read_text())
    for (name, kwargs), ranks in zip(named.items(), got):
        cfg = DataConfig(**kwargs)
        opened.clear()
        alone = validation_blocks(cfg, tokenizer)
        digest = hashlib.sha256(alone.numpy().tobytes()).hexdigest()
        assert [r["sha256"] for r in ranks] == [digest, digest], name
        assert [r["shape"] for r in ranks] == [list(alone.shape)] * 2, name
        # one shard per process per round, as many rounds as it takes to read what one
        # process alone reads (the rest of the last round's shards is read, then dropped)
        shards = open_source(cfg, "train" if name.startswith("carve") else "validation")
        end = min(2 * math.ceil(len(opened) / 2), shards.num_shards)
        assert ranks[0]["opened"] == list(range(0, end, 2)), name
        assert ranks[1]["opened"] == list(range(1, end, 2)), name
    lines = [line for line in printed.splitlines() if line.startswith("held-out set:")]
    assert len(lines) == 4 and all(line.endswith("read by 2 processes") for line in lines)
