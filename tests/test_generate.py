"""generate.py and export: reproducible sampling, batching parity, pipeline parity, errors."""

import subprocess
import sys

import pytest
import torch

import generate
from clm.config import run_cli
from clm.sampling import SamplingConfig
from helpers import ROOT, reset_accelerate, run, toy_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path_factory.mktemp("gen") / "run"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=8, save_steps=4,
                 eval_steps=0, num_samples=0))
    reset_accelerate()
    return out


def gen(model, *prompts, **kw):
    argv = ["--model", str(model), "--max_new_tokens", "12"]
    for p in prompts:
        argv += ["--prompt", p]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return run_cli(generate.main, [SamplingConfig], argv)


def test_same_seed_same_text(trained, capsys):
    a = gen(trained, "doc1", seed=3, num_return_sequences=2)
    b = gen(trained, "doc1", seed=3, num_return_sequences=2)
    c = gen(trained, "doc1", seed=4, num_return_sequences=2)
    assert a == b and a != c and len(a) == 2 and all(t.startswith("doc1") for t in a)
    assert a[0] in capsys.readouterr().out


def test_batched_greedy_equals_one_at_a_time(trained):
    prompts = ["doc1", "doc12 ka lo mi ten ra", "the"]
    batched = gen(trained, *prompts, do_sample="false")
    single = [gen(trained, p, do_sample="false")[0] for p in prompts]
    assert batched == single


def test_pipeline_gives_the_same_greedy_text(trained):
    from transformers import pipeline

    for folder in (trained, trained / "checkpoints" / "step-4"):
        ours = gen(folder, "doc3 ka", do_sample="false")[0]
        pipe = pipeline("text-generation", model=str(folder), device="cpu")
        theirs = pipe("doc3 ka", max_new_tokens=12, do_sample=False)[0]["generated_text"]
        assert ours == theirs


def test_stream_prints_the_text(trained, capsys):
    texts = gen(trained, "doc2", stream="true", do_sample="false")
    printed = capsys.readouterr().out
    assert texts[0].strip() and texts[0].strip() in printed


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--num_return_sequences", "2", "--do_sample", "false"], "needs sampling"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
])
def test_bad_options(trained, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_cli(generate.main, [SamplingConfig], ["--model", str(trained), "--prompt", "x", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_folder_without_model_is_one_line_error(tmp_path):
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(tmp_path),
                           "--prompt", "x"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no model" in lines[0] and "step-5" in lines[0]


def test_export_matches_the_training_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from clm.export import main as export_main

    out = tmp_path / "exported"
    export_main([str(trained / "checkpoints" / "step-8"), str(out)])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    final = AutoModelForCausalLM.from_pretrained(trained).eval()  # the model training ended with
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, final(input_ids=ids).logits)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with pytest.raises(SystemExit):
        export_main([str(trained / "checkpoints" / "step-8"), str(out)])  # not empty
