"""Build the offline demo corpus from the prose that ships inside installed Python packages.

    python -m clm.corpus --output_dir data/demo_corpus
    python -m clm.corpus --sft_file data/sft_demo/train.jsonl      # finetuning records

No text is committed to this repository and the Hub cannot be reached here, so the demo corpus is
made at set-up time: every docstring of the standard library and of the installed packages
(transformers, torch, datasets, ...), read with `ast` (no code is imported or run), cleaned of code
examples, deduplicated, and grouped one document per module. The result is written as parquet
shards laid out like OpenWebText on the Hub (`plain_text/train-0000i-of-0000n.parquet`, one `text`
column), so the demo streams through exactly the code a real run uses. The same installed packages
give the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
import sysconfig
import warnings
from pathlib import Path

# Packages whose docstrings are mostly English prose, in the order they are read. The standard
# library comes first so that a minimal environment still yields a useful corpus.
DEFAULT_PACKAGES = ("stdlib", "transformers", "torch", "datasets", "accelerate", "numpy",
                    "huggingface_hub", "pyarrow", "matplotlib", "tokenizers", "safetensors",
                    "yaml", "tqdm", "fsspec", "pandas", "pip", "setuptools")

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |In \[\d+\]|Out\[\d+\])")
_WORD = re.compile(r"[A-Za-z]{2,}")


def package_roots(names) -> list[tuple[str, Path]]:
    """(name, folder) for each requested package that is installed; 'stdlib' is the standard library."""
    roots = []
    for name in names:
        if name == "stdlib":
            roots.append((name, Path(sysconfig.get_paths()["stdlib"])))
            continue
        for base in sys.path:
            folder = Path(base) / name
            if base and folder.is_dir() and (folder / "__init__.py").exists():
                roots.append((name, folder))
                break
    return roots


def _module_files(name: str, root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        # Tests and vendored third-party code repeat or quote others' prose; skip them.
        if name == "stdlib" and (rel.startswith(("site-packages/", "test/", "idlelib/idle_test/"))
                                 or "/tests/" in rel):
            continue
        if "/tests/" in f"/{rel}" or "/_vendor/" in f"/{rel}":
            continue
        yield rel, path


def _prose(doc: str) -> str:
    """Keep the paragraphs of a docstring that read as English sentences."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.splitlines() if not _CODE_LINE.match(ln)]
        text = " ".join(ln.strip() for ln in lines).strip()
        if len(text) < 80:
            continue
        words = _WORD.findall(text)
        letters = sum(len(w) for w in words)
        # Parameter tables, signatures and code have few long words per character.
        if len(words) < 12 or letters < 0.6 * len(text):
            continue
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def module_docstrings(source: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def _file_paragraphs(path: Path) -> list[str]:
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    return [para for doc in module_docstrings(source) for para in _prose(doc).split("\n\n") if para]


def iter_documents(packages=DEFAULT_PACKAGES, min_chars: int = 200, processes: int | None = None):
    """Yield one document per module: its prose paragraphs, each paragraph seen only once overall."""
    from multiprocessing import Pool

    files = [path for name, root in package_roots(packages) for _, path in _module_files(name, root)]
    seen: set[bytes] = set()
    # Parsing is the slow part and is per file; imap keeps the file order, so the output is stable.
    with Pool(processes) as pool:
        for paragraphs in pool.imap(_file_paragraphs, files, chunksize=16):
            kept = []
            for para in paragraphs:
                key = hashlib.blake2b(para.lower().encode(), digest_size=16).digest()
                if key not in seen:
                    seen.add(key)
                    kept.append(para)
            text = "\n\n".join(kept)
            if len(text) >= min_chars:
                yield text


def iter_source_documents(packages=("stdlib",), min_chars: int = 200):
    """Yield one document per module: its whole source (code and comments), each distinct file
    once. A second corpus unlike the prose one (bench/learning_efficiency.py --corpus code)."""
    seen: set[bytes] = set()
    for name, root in package_roots(packages):
        for _, path in _module_files(name, root):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            key = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if len(text) >= min_chars and key not in seen:
                seen.add(key)
                yield text


def build_corpus(output_dir: str | Path, packages=DEFAULT_PACKAGES, num_shards: int = 4,
                 rows_per_group: int = 128, max_bytes: int | None = 10_000_000,
                 documents=None) -> dict:
    """Write the corpus as OpenWebText-like parquet shards; returns a summary. `documents`:
    the texts to write instead of the packages' prose (e.g. `iter_source_documents()`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs, size = [], 0
    for doc in documents if documents is not None else iter_documents(packages):
        docs.append(doc)
        size += len(doc.encode())
        if max_bytes and size >= max_bytes:
            break
    if not docs:
        raise ValueError(f"no prose found in packages {list(packages)}")
    out = Path(output_dir) / "plain_text"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    num_shards = max(1, min(num_shards, len(docs)))
    per_shard = -(-len(docs) // num_shards)
    for i in range(num_shards):
        table = pa.table({"text": docs[i * per_shard:(i + 1) * per_shard]})
        # Small row groups give the streaming reader many shards to spread over ranks and workers.
        pq.write_table(table, out / f"train-{i:05d}-of-{num_shards:05d}.parquet",
                       row_group_size=rows_per_group, compression="zstd")
    return {"documents": len(docs), "bytes": size, "shards": num_shards, "path": str(out)}


def _first_sentence(doc: str) -> str | None:
    first = " ".join(doc.split("\n\n")[0].split())
    end = first.find(". ")
    sentence = first if end < 0 else first[:end + 1]
    words = _WORD.findall(sentence)
    if not 30 <= len(sentence) <= 200 or len(words) < 5 or _CODE_LINE.match(sentence):
        return None
    return sentence if sentence.endswith(".") else sentence + "."


def _file_functions(item) -> list[tuple[str, str, str, list[str]]]:
    """(qualified name, signature line, first docstring sentence, parameter names) of a
    file's documented public functions."""
    module, path = item
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node, clean=True)
            sentence = _first_sentence(doc) if doc else None
            if sentence:
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args] + \
                    ([f"*{a.vararg.arg}"] if a.vararg else []) + \
                    [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
                found.append((f"{module}.{node.name}",
                              f"def {node.name}({ast.unparse(node.args)}):", sentence, names))
    return found


def build_sft_records(output_file: str | Path, packages=("stdlib",), max_records: int = 3000):
    """Instruction records from documented functions, a task with one right answer (so that
    exact match can score it): given a signature, list its parameter names, defaults and
    annotations left out. Half are prompt/completion records, half chats; functions whose
    first docstring sentence was seen already are skipped, so near-copies stay rare."""
    import json

    items = [(rel[:-3].replace("/", ".").removesuffix(".__init__"), path)
             for name, root in package_roots(packages) for rel, path in _module_files(name, root)]
    records, seen = [], set()
    for item in items:
        for qualname, signature, sentence, names in _file_functions(item):
            if sentence.lower() in seen or not names or len(signature) > 120:
                continue
            seen.add(sentence.lower())
            answer = ", ".join(names)
            if len(records) % 2 == 0:
                records.append({"prompt": f"{signature}\n# parameters:",
                                "completion": f" {answer}"})
            else:
                records.append({"messages": [
                    {"role": "user", "content": f"Parameters of {signature}"},
                    {"role": "assistant", "content": answer}]})
            if len(records) >= max_records:
                break
        if len(records) >= max_records:
            break
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"records": len(records), "path": str(out)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="data/demo_corpus")
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                        help="installed packages to read ('stdlib' = the standard library)")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--max_bytes", type=int, default=10_000_000, help="stop after this much text")
    parser.add_argument("--sft_file", default=None,
                        help="instead, write finetuning records (jsonl) from documented functions")
    args = parser.parse_args(argv)
    if args.sft_file:
        summary = build_sft_records(args.sft_file, args.packages)
        print(f"demo finetuning records: {summary['records']} at {summary['path']}")
        return
    summary = build_corpus(args.output_dir, args.packages, args.num_shards, max_bytes=args.max_bytes)
    print(f"demo corpus: {summary['documents']} documents, {summary['bytes'] / 1e6:.1f} MB "
          f"in {summary['shards']} parquet shards at {summary['path']}")


if __name__ == "__main__":
    main()
