"""Shared fixtures: a small corpus made on the fly (parquet shards and jsonl) and a BPE trained on it."""

import json
import os
import random
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# Keep the datasets cache (used by --streaming false) out of the user's home.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="clm-tests-hf-"))

SYLLABLES = ["ka", "lo", "mi", "ten", "ra", "sol", "ve", "nu", "dor", "pa", "is", "the", "an", "e"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text documents of varied lengths, each starting with its index."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120)))
        docs.append(f"doc{i} {body}.")
    return docs


def write_parquet_corpus(root, docs, num_files=3, rows_per_group=20):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "plain_text"
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // num_files)
    for i in range(num_files):
        part = docs[i * per:(i + 1) * per]
        table = pa.table({"text": part, "id": list(range(i * per, i * per + len(part)))})
        pq.write_table(table, folder / f"train-{i:05d}-of-{num_files:05d}.parquet",
                       row_group_size=rows_per_group)
    return root


@pytest.fixture(scope="session")
def corpus_docs():
    return make_documents(240)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, corpus_docs):
    return write_parquet_corpus(tmp_path_factory.mktemp("corpus"), corpus_docs)


@pytest.fixture(scope="session")
def jsonl_file(tmp_path_factory, corpus_docs):
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(corpus_docs)))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir):
    from clm.config import DataConfig
    from clm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(DataConfig(dataset_name=str(corpus_dir)), vocab_size=400, output_dir=str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from clm.data import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def toy_config_dir(tmp_path_factory):
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("toy_config")
    GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a fresh process would."""
    yield
    from helpers import reset_accelerate

    reset_accelerate()
