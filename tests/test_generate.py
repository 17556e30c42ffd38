"""generate.py and export: reproducible sampling, batching parity, pipeline parity, LoRA runs,
errors."""

import subprocess
import sys

import pytest
import torch

import generate
from clm.config import run_cli
from clm.sampling import SamplingConfig
from helpers import ROOT, reset_accelerate, run, toy_args
from test_sft import records, run_sft_main, sft_args, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir, tokenizer_dir, toy_config_dir):
    """A toy run whose greedy text depends on the prompt and on position. With GPT-2's init
    (std 0.02) a few steps on this corpus learn only its unigram distribution, so every prompt
    gets the same word over and over, and a batch with broken padding would still match each
    prompt alone. A wider init keeps the untrained model's dependence on its context."""
    from transformers import GPT2Config

    config_dir = tmp_path_factory.mktemp("gen_config")
    config = GPT2Config.from_pretrained(toy_config_dir)
    config.initializer_range = 0.2
    config.save_pretrained(config_dir)
    out = tmp_path_factory.mktemp("gen") / "run"
    run(toy_args(corpus_dir, tokenizer_dir, config_dir, out, max_steps=8, save_steps=4,
                 eval_steps=0, num_samples=0))
    reset_accelerate()
    return out


PROMPTS = ["doc1", "doc12 ka lo mi ten ra", "the", "doc3 ka"]  # 1 to 8 tokens


def continuations(texts, prompts):
    return [t[len(p):] for t, p in zip(texts, prompts, strict=True)]


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
    batched = gen(trained, *PROMPTS, do_sample="false")
    single = [gen(trained, p, do_sample="false")[0] for p in PROMPTS]
    assert batched == single
    # what makes the line above a test of padding: each prompt leads somewhere else, so a
    # prompt that saw its neighbours' padding (or the wrong positions) would lead elsewhere too
    # (how many prompts lead apart depends on the toy run's last bits, so not all are asked to;
    # test_batched_scores_equal_one_at_a_time compares every step's logits as well)
    ends = continuations(single, PROMPTS)
    assert len(set(ends)) > 1, ends
    assert any(len(set(e.split())) > 1 for e in ends), ends


def test_batched_scores_equal_one_at_a_time(trained):
    # the text can agree while padding leaks a little into the logits: compare those too, at
    # every generated position, through what complete() does (same tokenizer, same kwargs)
    from clm.sampling import generation_kwargs, load_model

    model, tokenizer = load_model(str(trained), "cpu", "float32")
    cfg = SamplingConfig(model=str(trained), prompt=PROMPTS, do_sample=False, max_new_tokens=6)
    kwargs = dict(generation_kwargs(cfg, tokenizer), output_scores=True,
                  return_dict_in_generate=True)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the prompts need padding"
    with torch.no_grad():
        batched = model.generate(**batch, **kwargs).scores
        for row, prompt in enumerate(PROMPTS):
            alone = model.generate(**tokenizer([prompt], return_tensors="pt"), **kwargs).scores
            for a, b in zip(batched, alone, strict=True):
                torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-4)
    first = batched[0].argmax(-1)
    assert len(set(first.tolist())) > 1, "every prompt predicts the same first token"


def test_pipeline_gives_the_same_greedy_text(trained):
    from transformers import pipeline

    for folder in (trained, trained / "checkpoints" / "step-4"):
        ours = gen(folder, *PROMPTS, do_sample="false")
        pipe = pipeline("text-generation", model=str(folder), device="cpu")
        theirs = [pipe(p, max_new_tokens=12, do_sample=False)[0]["generated_text"]
                  for p in PROMPTS]
        assert ours == theirs
        ends = continuations(ours, PROMPTS)
        assert len(set(ends)) > 1, ends


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


# ----------------------------------------------------------------------------- LoRA runs

@pytest.fixture(scope="module")
def lora(tmp_path_factory, trained):
    """A LoRA finetune of `trained` as test_sft.py runs one, twice: with the adapters merged
    into the final folder (checkpoints hold the adapters and the training state), and with
    --merge_adapters false (the final folder holds the adapters only)."""
    root = tmp_path_factory.mktemp("lora")
    data = write_jsonl(root / "records.jsonl", records())
    args = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    merged, adapters = root / "merged", root / "adapters"
    for out, extra in ((merged, []), (adapters, ["--merge_adapters", "false"])):
        run_sft_main(sft_args(trained, data, out, max_steps=6, save_steps=6, eval_steps=0,
                              num_samples=0) + args + extra)
        reset_accelerate()
    return merged, adapters


IDS = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_generate_loads_lora_checkpoints_and_adapter_folders(trained, lora):
    from transformers import AutoModelForCausalLM

    from clm.sampling import load_model

    merged, adapters = lora
    checkpoint = merged / "checkpoints" / "step-6"
    for folder in (checkpoint, adapters):  # what run_sft.py --use_peft writes there
        assert (folder / "adapter_config.json").is_file()
        assert not (folder / "config.json").exists()
    want = logits(AutoModelForCausalLM.from_pretrained(merged))
    # the adapters moved the model: loading the base and ignoring them would not pass
    assert (want - logits(AutoModelForCausalLM.from_pretrained(trained))).abs().max() > 1e-3
    for folder in (checkpoint, adapters, merged / "adapter"):
        model, tokenizer = load_model(str(folder), "cpu", "float32")
        assert type(model).__name__ == "GPT2LMHeadModel", "a plain model, adapters merged in"
        torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
        assert tokenizer.chat_template, "the finetune's tokenizer, with its chat template"
    text = gen(merged, *PROMPTS, do_sample="false")
    assert gen(checkpoint, *PROMPTS, do_sample="false") == text
    assert gen(adapters, *PROMPTS, do_sample="false") == text


def test_export_merges_lora_checkpoints_and_adapter_folders(lora, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from clm.export import main as export_main

    merged, adapters = lora
    want = logits(AutoModelForCausalLM.from_pretrained(merged))
    keys = set(load_file(merged / "model.safetensors"))
    sources = (merged / "checkpoints" / "step-6", adapters, adapters / "checkpoints" / "step-6")
    for i, source in enumerate(sources):
        out = tmp_path / f"exported{i}"
        export_main([str(source), str(out)])
        assert not (out / "adapter_config.json").exists(), "a plain model folder"
        assert set(load_file(out / "model.safetensors")) == keys
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, found", [
    ("empty", "found nothing, the folder is empty"),
    ("tokenizer", "found tokenizer files only"),
    ("checkpoints", "found 2 checkpoint folders (pass one of them, e.g. the newest: "),
])
def test_folder_without_model_says_what_it_holds(trained, tmp_path, capsys, layout, found):
    from transformers import AutoTokenizer

    from clm.export import main as export_main

    folder = tmp_path / "folder"
    if layout == "empty":
        folder.mkdir()
    elif layout == "tokenizer":
        AutoTokenizer.from_pretrained(trained).save_pretrained(folder)
    else:
        folder = trained / "checkpoints"
    for arg, call in (("--model ", lambda: gen(folder, "x")),
                      ("", lambda: export_main([str(folder), str(tmp_path / "out")]))):
        with pytest.raises(SystemExit) as e:
            call()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {arg}{folder} holds no model: {found}"), err
    assert not (tmp_path / "out").exists()
