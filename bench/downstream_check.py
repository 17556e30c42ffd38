"""The folders this project writes, in the tools users take them to next: one pinned virtual
environment per client, each run on freshly trained demo folders, one table.

    bash bench/downstream_check.sh                  # train, build the environments, print the table
    bash bench/downstream_check.sh --clients onnx,gguf --reuse

Folders (under --work, default bench/.downstream/): `pretrained` (configs/demo_cpu.yaml, a few
steps), `sft` (finetune/run_sft.py on the demo records, from it) and `lora` (the same with
--use_peft: the merged folder and its `adapter/`). Each is scored here, with this project's
transformers, on fixed token ids: those logits are the reference every client is compared with.

Clients (each its own venv under --work/venvs, its pins below, from the package registries):
  transformers4  transformers 4.57: tokenizer ids and logits of every folder
  lm_eval        lm-eval 0.4.13's command line (`--model hf`) on the shipped local tasks
  onnx           optimum-onnx export (text-generation-with-past), its tokenizer, ONNX Runtime's
                 logits
  gguf           llama.cpp's GGUF converter, from the llama-cpp-python source distribution,
                 read back with its gguf package: every tensor against the folder's
  ctranslate2    ct2-transformers-converter, then CTranslate2's logits
  peft           the LoRA adapter folder loaded by peft, its logits against the merged folder
Prints a table: client, folder, works, max |logit or weight difference|, what was checked.
Not in CI (it installs clients); its table is in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
# each client's pip installs, in order
CLIENTS = {
    "transformers4": [[TORCH, "transformers==4.57.6"]],
    "lm_eval": [[TORCH, "transformers==5.24.0", "lm-eval[hf]==0.4.13"]],
    "onnx": [[TORCH, "transformers==4.57.6", "optimum==2.1.0", "optimum-onnx==0.1.0",
              "onnx==1.23.2", "onnxruntime==1.32.0"]],
    "gguf": [[TORCH, "transformers==5.24.0", "numpy", "sentencepiece", "protobuf"]],
    "ctranslate2": [[TORCH, "transformers==5.24.0", "ctranslate2==4.8.5"]],
    "peft": [[TORCH, "transformers==5.24.0", "peft==0.21.2"]],
}
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist carries llama.cpp's converter
TEXT = "The river runs past the old village, and the boats go down to the sea."


def sh(cmd, log, **kw) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        return subprocess.call(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, **kw)


def train_folders(work: Path, log: Path) -> dict:
    """The three demo folders (trained once, reused with --reuse)."""
    py = sys.executable
    out = {"pretrained": work / "pretrained", "sft": work / "sft", "lora": work / "lora"}
    if not (out["pretrained"] / "model.safetensors").is_file():
        sh([py, ROOT / "train_clm.py", "--config", ROOT / "configs/demo_cpu.yaml",
            "--max_steps", 40, "--eval_steps", 40, "--save_steps", 0, "--num_samples", 0,
            "--output_dir", out["pretrained"], "--overwrite_output_dir"], log, cwd=ROOT)
    sft_file = ROOT / "data/sft_demo/train.jsonl"
    if not sft_file.is_file():
        sh([py, "-m", "clm.corpus", "--sft_file", sft_file], log, cwd=ROOT)
    common = ["--config", ROOT / "configs/sft_demo.yaml", "--model_name_or_path",
              out["pretrained"], "--max_steps", 20, "--eval_steps", 20, "--save_steps", 0,
              "--num_samples", 0, "--eval_generate_samples", 4, "--overwrite_output_dir"]
    if not (out["sft"] / "model.safetensors").is_file():
        sh([py, ROOT / "finetune/run_sft.py", *common, "--output_dir", out["sft"]], log, cwd=ROOT)
    if not (out["lora"] / "adapter" / "adapter_config.json").is_file():
        sh([py, ROOT / "finetune/run_sft.py", *common, "--output_dir", out["lora"],
            "--use_peft", "true"], log, cwd=ROOT)
    missing = [k for k, v in out.items() if not (v / "model.safetensors").is_file()]
    if missing:
        sys.exit(f"could not train {missing}: see {log}")
    return out


def reference(folders: dict, work: Path) -> Path:
    """Token ids of TEXT and each folder's logits on them, by this project's transformers."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = work / "reference"
    ref.mkdir(exist_ok=True)
    for name, folder in folders.items():
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(TEXT)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        np.save(ref / f"{name}.npy", logits)
        (ref / f"{name}.json").write_text(json.dumps({"ids": ids}))
    return ref


def make_venv(name: str, work: Path, reuse: bool, log: Path) -> Path | None:
    venv = work / "venvs" / name
    python = venv / "bin" / "python"
    stamp = venv / ".pins"
    pins = json.dumps(CLIENTS[name])
    if reuse and stamp.is_file() and stamp.read_text() == pins:
        return python
    if sh(["python3", "-m", "venv", "--clear", venv], log) != 0:
        return None
    for step in CLIENTS[name]:
        if sh([python, "-m", "pip", "install", "--quiet", *step], log) != 0:
            return None
    stamp.write_text(pins)
    return python


# ------------------------------------------------------------------ the checks, run in each venv

PRELUDE = """
import json, sys, subprocess, os
from pathlib import Path
import numpy as np
args = json.loads(sys.argv[1]) if __name__ == "__main__" else {"ref": ".", "work": "."}
ref, work = Path(args["ref"]), Path(args["work"])
def ids_of(name):
    return json.loads((ref / f"{name}.json").read_text())["ids"]
def diff(name, logits):
    return float(np.abs(np.asarray(logits, dtype=np.float64) - np.load(ref / f"{name}.npy")).max())
def last_line(proc):
    lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
    return (lines or ["(no output)"])[-1][:200]
def report(**row):
    print("RESULT " + json.dumps(row), flush=True)
"""

CHECKS = {
    "transformers4": """
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
for name, folder in args["folders"].items():
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        same = tok(args["text"])["input_ids"] == ids_of(name)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids_of(name)])).logits[0].numpy()
        cut = len(tok("word " * 5000, truncation=True)["input_ids"])
        report(folder=name, works=same, diff=diff(name, logits),
               note=f"transformers {transformers.__version__}: {type(tok).__name__}, ids "
                    f"{'equal' if same else 'DIFFER'}, use_cache {model.config.use_cache}, "
                    f"truncation to {cut} of {model.config.n_positions}")
    except Exception as e:
        report(folder=name, works=False, diff=None, note=f"{type(e).__name__}: {e}"[:200])
""",
    "lm_eval": """
for name, folder in args["folders"].items():
    out = work / "lm_eval" / name
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={folder},dtype=float32", "--tasks",
           "demo_choice,demo_perplexity,demo_generate", "--include_path", args["tasks"],
           "--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(out.rglob("results_*.json"))
    if proc.returncode or not found:
        report(folder=name, works=False, diff=None, note=last_line(proc))
        continue
    res = json.loads(found[-1].read_text())["results"]
    report(folder=name, works=True, diff=None,
           note=f"acc {res['demo_choice']['acc,none']:.3f}, acc_norm "
                f"{res['demo_choice']['acc_norm,none']:.3f}, word ppl "
                f"{res['demo_perplexity']['word_perplexity,none']:.1f}, exact match "
                f"{res['demo_generate']['exact_match,strip']:.3f}")
""",
    "onnx": """
from transformers import AutoTokenizer
for name, folder in args["folders"].items():
    out = work / "onnx" / name
    proc = subprocess.run([str(Path(sys.executable).parent / "optimum-cli"), "export", "onnx",
                           "--model", folder, "--task", "text-generation-with-past", str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        report(folder=name, works=False, diff=None, note=last_line(proc))
        continue
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
        import torch
        model = ORTModelForCausalLM.from_pretrained(out)
        ids = torch.tensor([ids_of(name)])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
        tok = (out / "tokenizer.json").is_file() and \\
            AutoTokenizer.from_pretrained(out)(args["text"])["input_ids"] == ids_of(name)
        report(folder=name, works=bool(tok), diff=diff(name, logits),
               note=f"ONNX Runtime logits; tokenizer exported with it: {bool(tok)}")
    except Exception as e:
        report(folder=name, works=False, diff=None, note=f"{type(e).__name__}: {e}"[:200])
""",
    "gguf": """
converter = Path(args["converter"])
sys.path.insert(0, str(converter.parent / "gguf-py"))
import gguf
from safetensors.numpy import load_file
for name, folder in args["folders"].items():
    out = work / "gguf" / f"{name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(converter), folder, "--outfile", str(out), "--outtype", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    note = "converted as it is"
    if proc.returncode and "pre-tokenizer" in (proc.stderr + proc.stdout):
        # the converter knows pre-tokenizers by a hash of known vocabularies' output: a newly
        # trained BPE vocabulary is unknown to it. Ours splits text as GPT-2's does: name it so.
        wrap = work / "gguf" / "convert_as_gpt2.py"
        wrap.write_text("import runpy, sys\\n"
                        f"sys.path.insert(0, {str(converter.parent)!r})\\n"
                        "import convert_hf_to_gguf as c\\n"
                        "try:\\n"
                        "    from conversion.base import TextModel\\n"
                        "except ImportError:\\n"
                        "    TextModel = c.TextModel\\n"
                        "TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\\n"
                        "sys.argv = sys.argv[1:]\\n"
                        "c.main()\\n")
        proc = subprocess.run([sys.executable, str(wrap), *cmd[1:]], capture_output=True,
                              text=True)
        note = "only with the workaround: pre-tokenizer named gpt-2 (the converter does not know a new vocabulary's hash)"
    if proc.returncode:
        report(folder=name, works=False, diff=None, note=last_line(proc))
        continue
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    weights = load_file(str(Path(folder) / "model.safetensors"))
    worst, matched = 0.0, 0
    for t in tensors.values():  # each GGUF tensor equals one of the folder's, maybe transposed
        best = min((float(np.abs(t.astype(np.float64) - c).max())
                    for w in weights.values() for c in (w, w.T) if c.shape == t.shape),
                   default=None)
        if best is not None:
            worst, matched = max(worst, best), matched + 1
    ctx = reader.fields.get("gpt2.context_length")
    report(folder=name, works=matched == len(tensors), diff=worst,
           note=f"{note}; {matched}/{len(tensors)} tensors read back equal a weight; "
                f"context_length {int(ctx.parts[-1][0]) if ctx else None}")
""",
    "ctranslate2": """
import ctranslate2
for name, folder in args["folders"].items():
    out = work / "ct2" / name
    proc = subprocess.run([str(Path(sys.executable).parent / "ct2-transformers-converter"),
                           "--model", folder, "--output_dir", str(out), "--force"],
                          capture_output=True, text=True)
    if proc.returncode:
        report(folder=name, works=False, diff=None, note=last_line(proc))
        continue
    gen = ctranslate2.Generator(str(out), device="cpu", compute_type="float32")
    logits = np.array(gen.forward_batch([ids_of(name)]))[0]
    report(folder=name, works=True, diff=diff(name, logits),
           note=f"CTranslate2 {ctranslate2.__version__} forward_batch logits")
""",
    "peft": """
import torch, peft
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
adapter = Path(args["folders"]["lora"]) / "adapter"
try:
    tok = AutoTokenizer.from_pretrained(adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids_of("lora")])).logits[0].numpy()
    report(folder="lora/adapter", works=tok(args["text"])["input_ids"] == ids_of("lora"),
           diff=diff("lora", logits),
           note=f"peft {peft.__version__}: adapter on its base against the merged folder; "
                f"tokenizer and chat template beside it: {tok.chat_template is not None}")
except Exception as e:
    report(folder="lora/adapter", works=False, diff=None, note=f"{type(e).__name__}: {e}"[:200])
""",
}


def llama_cpp_converter(work: Path, log: Path) -> Path | None:
    """convert_hf_to_gguf.py (and its gguf-py) from the llama-cpp-python source distribution."""
    dest = work / "llama_cpp"
    found = list(dest.rglob("convert_hf_to_gguf.py"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    if sh([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
           ":all:", "-d", dest, LLAMA_CPP_PYTHON], log) != 0:
        return None
    for sdist in dest.glob("*.tar.gz"):
        with tarfile.open(sdist) as tar:
            tar.extractall(dest, filter="data")
    found = list(dest.rglob("convert_hf_to_gguf.py"))
    return found[0] if found else None


def run_client(name: str, python: Path, folders: dict, ref: Path, work: Path, log: Path,
               extra: dict) -> list[dict]:
    script = work / "checks" / f"check_{name}.py"  # not {name}.py: it would shadow the package
    script.parent.mkdir(parents=True, exist_ok=True)
    # a function run under the __main__ guard: a client may start worker processes that
    # import the script again (multiprocessing's spawn), which must not rerun the check
    body = textwrap.indent(textwrap.dedent(CHECKS[name]), "    ")
    script.write_text(PRELUDE + "\ndef main():\n" + body +
                      "\nif __name__ == '__main__':\n    main()\n")
    args = {"folders": {k: str(v) for k, v in folders.items()}, "ref": str(ref),
            "work": str(work), "text": TEXT, **extra}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(python), str(script), json.dumps(args)], capture_output=True,
                          text=True, env=env, cwd=work)
    with open(log, "a") as f:
        f.write(f"--- {name}\n{proc.stdout}\n{proc.stderr}\n")
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]
    if not rows:
        rows = [{"folder": "-", "works": False, "diff": None,
                 "note": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / ".downstream"))
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--reuse", action="store_true",
                        help="keep environments whose pins are unchanged, and trained folders")
    parser.add_argument("--results", default=None, help="also write the rows here (JSON lines)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    if not args.reuse:
        log.write_text("")
    names = [c for c in args.clients.split(",") if c]
    unknown = [c for c in names if c not in CLIENTS]
    if unknown:
        sys.exit(f"unknown --clients {','.join(unknown)} (choose from {', '.join(CLIENTS)})")
    start = time.time()
    folders = train_folders(work, log)
    ref = reference(folders, work)
    sys.path.insert(0, str(ROOT))
    from clm.harness import write_tasks

    extra = {"tasks": str(write_tasks(work / "tasks"))}
    if "gguf" in names:
        converter = llama_cpp_converter(work, log)
        extra["converter"] = str(converter) if converter else ""
    shutil.rmtree(work / "checks", ignore_errors=True)  # no stale script shadows a package
    rows = []
    for name in names:
        python = make_venv(name, work, args.reuse, log)
        if python is None:
            rows.append({"client": name, "folder": "-", "works": False, "diff": None,
                         "note": f"could not install {CLIENTS[name]}: see {log}"})
            continue
        if name == "gguf" and not extra.get("converter"):
            rows.append({"client": name, "folder": "-", "works": False, "diff": None,
                         "note": f"no converter in {LLAMA_CPP_PYTHON}'s sdist"})
            continue
        for row in run_client(name, python, folders, ref, work, log, extra):
            rows.append({"client": name, **row})
        print(f"# {name} done ({time.time() - start:.0f} s)", flush=True)
    if args.results:
        Path(args.results).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("| client | folder | works | max abs difference | checked |")
    print("|---|---|---|---|---|")
    for r in rows:
        d = "-" if r["diff"] is None else f"{r['diff']:.1e}"
        note = " ".join(str(r["note"]).split()).replace("|", "/")
        print(f"| {r['client']} | {r['folder']} | {'yes' if r['works'] else 'NO'} | {d} | "
              f"{note} |")


if __name__ == "__main__":
    main()
