"""The demo corpus builder: real prose from installed packages, deterministic, OWT-shaped."""

import pyarrow.parquet as pq

from clm.corpus import build_corpus, iter_source_documents, module_docstrings


def test_build_is_deterministic_and_shaped_like_openwebtext(tmp_path):
    packages = ["json", "email", "urllib", "logging"]  # small stdlib packages: fast
    a = build_corpus(tmp_path / "a", packages, num_shards=2, rows_per_group=8)
    b = build_corpus(tmp_path / "b", packages, num_shards=2, rows_per_group=8)
    assert a["documents"] > 10 and a["bytes"] > 20_000
    files = sorted((tmp_path / "a" / "plain_text").glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00002.parquet",
                                       "train-00001-of-00002.parquet"]
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / "plain_text" / f.name).read_bytes()
        meta = pq.ParquetFile(f).metadata
        assert meta.num_row_groups > 1 and meta.schema.names == ["text"]
    texts = [t for f in files for t in pq.read_table(f)["text"].to_pylist()]
    assert len(texts) == len(set(texts))
    assert not any(">>>" in t for t in texts), "code examples are dropped"
    assert b["bytes"] == a["bytes"]


def test_docstrings_are_read_without_running_code():
    source = 'import sys\nsys.exit(3)\ndef f():\n    """Say hi."""\nclass C:\n    """A class."""\n'
    assert module_docstrings(source) == ["Say hi.", "A class."]
    assert module_docstrings("def broken(:\n") == []


def test_the_second_corpus_is_source_code_each_file_once(tmp_path):
    """bench/learning_efficiency.py --corpus code: whole modules of the standard library."""
    docs = list(iter_source_documents(["json"]))
    assert len(docs) >= 4 and len(set(docs)) == len(docs)
    assert any("def dumps(" in d for d in docs) and all(len(d) >= 200 for d in docs)
    summary = build_corpus(tmp_path / "code", documents=iter(docs), num_shards=2)
    texts = [t for f in sorted((tmp_path / "code" / "plain_text").glob("*.parquet"))
             for t in pq.read_table(f)["text"].to_pylist()]
    assert texts == docs and summary["documents"] == len(docs)
