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
    (["--chat", "--num_return_sequences", "2"], "does not go with --chat"),
    (["--chat", "--prompt", "y"], "--chat takes one --prompt"),
    (["--system", "be brief"], "--system needs --chat"),
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


def test_export_reads_the_backend_the_manifest_names(trained, tmp_path, monkeypatch, capsys):
    """The manifest names the backend that wrote state/ ("ddp" here), and export asks that
    backend for the weights: it does not guess from the files. A manifest naming another
    backend is read as that backend's state (and fails for want of its files); one naming no
    backend this version knows is a one-line error."""
    import json
    import shutil

    from clm import parallel
    from clm.export import main as export_main

    checkpoint = tmp_path / "step-8"
    shutil.copytree(trained / "checkpoints" / "step-8", checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["backend"] == "ddp"
    asked = []
    for name, cls in parallel.BACKENDS.items():
        real = cls.weights_from_state
        monkeypatch.setattr(cls, "weights_from_state",
                            staticmethod(lambda d, n=name, f=real: asked.append(n) or f(d)))
    export_main([str(checkpoint), str(tmp_path / "ddp")])
    assert asked == ["ddp"]

    (checkpoint / "manifest.json").write_text(json.dumps({**manifest, "backend": "fsdp"}))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # FSDP's reader finds no state/dcp/ folder
        export_main([str(checkpoint), str(tmp_path / "fsdp")])
    assert asked == ["ddp", "fsdp"]
    assert "has no dcp/.metadata, which a training state saved by the fsdp backend holds" in \
        capsys.readouterr().err

    del manifest["backend"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        export_main([str(checkpoint), str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "manifest names no backend this version reads (None; known: ddp, deepspeed, fsdp)" \
        in err[0]


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


# ----------------------------------------------------------------------------- chat

CHATML = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, tokenizer_dir):
    """Untrained 2-layer GPT-2s (context 128) over the test tokenizer, no training needed:
    "chat" has the chat template run_sft.py saves with a GPT-2 tokenizer (clm.sft's, turns
    ended by EOS), "plain" has no template, "chatml" has a template that ends turns with its own
    special token <|end|>, not EOS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clm import sft
    from clm.data import load_tokenizer

    root = tmp_path_factory.mktemp("chat_models")
    folders = {}
    for name in ("plain", "chat", "chatml"):
        tokenizer = load_tokenizer(str(tokenizer_dir))
        assert not tokenizer.chat_template
        if name == "chat":
            sft.ensure_chat_template(tokenizer)  # what finetune/run_sft.py does
        elif name == "chatml":
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>"]})
            tokenizer.chat_template = CHATML
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128,
                            vocab_size=len(tokenizer), initializer_range=0.2,
                            bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        folders[name] = root / name
        GPT2LMHeadModel(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def chat(model, prompt=None, **kw):
    argv = ["--model", str(model), "--chat", "--max_new_tokens", "8"]
    if prompt is not None:
        argv += ["--prompt", prompt]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return run_cli(generate.main, [SamplingConfig], argv)


def spy_on_model(monkeypatch, setup=None):
    """Make generate.main's model record each generate() call in `spy.calls` as (kwargs,
    output); `setup(model, tokenizer)` runs on it first; `spy.model` is the model."""
    from types import SimpleNamespace

    from clm import sampling

    spy, load = SimpleNamespace(calls=[], model=None), sampling.load_model

    def load_and_spy(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        if setup:
            setup(model, tokenizer)
        real = model.generate

        def generate(**gen_kwargs):
            out = real(**gen_kwargs)
            spy.calls.append((gen_kwargs, out))
            return out

        model.generate, spy.model = generate, model
        return model, tokenizer

    monkeypatch.setattr(sampling, "load_model", load_and_spy)
    return spy


def test_end_of_turn_is_read_from_the_template(chat_models):
    from transformers import AutoTokenizer

    from clm.sampling import end_of_turn_ids

    run_sft_style = AutoTokenizer.from_pretrained(chat_models["chat"])
    assert end_of_turn_ids(run_sft_style) == [run_sft_style.eos_token_id]
    chatml = AutoTokenizer.from_pretrained(chat_models["chatml"])
    end = chatml.convert_tokens_to_ids("<|end|>")
    assert end != chatml.eos_token_id and end_of_turn_ids(chatml) == [end]


def test_chat_one_shot_answers_the_templated_prompt_and_stops_at_end_of_turn(
        chat_models, monkeypatch, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_models["chatml"])
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    steps = []

    def force_end_of_turn(model, tokenizer):  # the 4th token of a reply is <|end|>
        def hook(module, inputs, logits):
            steps.append(1)
            if len(steps) == 4:
                logits = logits.clone()
                logits[:, -1, end] = 1e4
            return logits
        model.lm_head.register_forward_hook(hook)

    spy = spy_on_model(monkeypatch, force_end_of_turn)
    [reply] = chat(chat_models["chatml"], "ka lo", do_sample="false", max_new_tokens=12)
    printed = capsys.readouterr().out
    (kwargs, out), = spy.calls
    # the prompt is the template's rendering of the user's message, generation prompt included
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ka lo"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|start|>assistant\n")
    prompt = kwargs["input_ids"][0].tolist()
    assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt) == text
    # it stops at the end-of-turn token, which is not EOS; EOS stops it as well
    assert end in kwargs["eos_token_id"] and tokenizer.eos_token_id in kwargs["eos_token_id"]
    new = out[0, len(prompt):].tolist()
    assert len(new) == 4 and new[-1] == end, new
    # ... where the same model would have gone on: the forcing alone does not stop it
    steps.clear()
    longer = spy.model.generate(**kwargs | {"eos_token_id": [tokenizer.eos_token_id],
                                            "streamer": None})
    longer = longer[0, len(prompt):].tolist()
    assert len(longer) > 4 and longer[:4] == new, longer
    # only the reply is printed (streamed by default): no prompt, no special token
    assert reply == tokenizer.decode(new, skip_special_tokens=True).strip() and reply
    assert printed.strip() == reply and printed.endswith("\n")
    assert "<|end|>" not in printed and "assistant" not in printed


def spy_on_prompts(monkeypatch):
    """Each message list the chat renders with add_generation_prompt (a copy), in order."""
    import copy

    from clm import sampling

    seen, real = [], sampling.chat_prompt_ids

    def chat_prompt_ids(tokenizer, messages):
        seen.append(copy.deepcopy(messages))
        return real(tokenizer, messages)

    monkeypatch.setattr(sampling, "chat_prompt_ids", chat_prompt_ids)
    return seen


def test_chat_loop_keeps_the_history_until_reset(chat_models, monkeypatch, capsys):
    import io

    seen = spy_on_prompts(monkeypatch)
    spy = spy_on_model(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("ka lo\n\nmi ten\n/reset\nsol ve\n"))
    chat(chat_models["chat"], system="be brief", do_sample="false")  # returns: no SystemExit
    out, err = capsys.readouterr()
    replies = [line.strip() for line in out.splitlines()]
    assert len(spy.calls) == 3 and len(replies) == 3 and all(replies), out
    assert "> " not in out, "no prompt when stdin is not a terminal"
    system = {"role": "system", "content": "be brief"}
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert seen == [[system, user("ka lo")],
                    [system, user("ka lo"), {"role": "assistant", "content": replies[0]},
                     user("mi ten")],
                    [system, user("sol ve")]]  # /reset kept the system message only
    assert "history cleared" in err and "dropped" not in err


def test_chat_loop_reads_a_pipe_and_quits_with_status_0(chat_models):
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model",
                           str(chat_models["chat"]), "--chat", "--max_new_tokens", "6"],
                          input="ka lo\n/quit\nmi ten\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout  # nothing after /quit


def test_chat_without_a_template_is_one_line_error(chat_models):
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model",
                           str(chat_models["plain"]), "--chat", "--prompt", "ka lo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --chat: "), lines
    assert "no chat template" in lines[0] and "finetune/run_sft.py" in lines[0]


def test_chat_same_seed_same_reply(chat_models, capsys):
    a, b, c = (chat(chat_models["chat"], "ka lo", seed=s, max_new_tokens=12) for s in (3, 3, 4))
    assert a == b and a != c and a[0]


def test_chat_drops_the_oldest_turns_to_fit_the_context(chat_models, capsys):
    import io

    from clm.config import UsageError
    from clm.sampling import chat_loop, chat_prompt_ids, fit_to_context, load_model

    model, tokenizer = load_model(str(chat_models["chat"]), "cpu", "float32")
    turn = lambda i: [{"role": "user", "content": f"question {i} ka lo"},  # noqa: E731
                      {"role": "assistant", "content": f"answer {i} mi ten"}]
    system = [{"role": "system", "content": "be brief"}]
    history = system + turn(1) + turn(2) + turn(3) + turn(4)[:1]
    fits = system + turn(3) + turn(4)[:1]  # what 2 dropped turns leave
    room = len(chat_prompt_ids(tokenizer, fits))
    assert room < len(chat_prompt_ids(tokenizer, system + turn(2) + turn(3) + turn(4)[:1]))
    ids = fit_to_context(model, tokenizer, history, 128 - room, sys.stderr)
    assert history == fits and ids == chat_prompt_ids(tokenizer, fits)
    assert "dropped the 2 oldest turns" in capsys.readouterr().err
    # a message that does not fit alone is refused, and the history stays as it was
    alone = len(chat_prompt_ids(tokenizer, system + turn(5)[:1]))
    history.append(turn(5)[0])
    with pytest.raises(UsageError, match="shorten it"):
        fit_to_context(model, tokenizer, history, 128 - alone + 1)
    assert history == fits + turn(5)[:1]
    # the loop says so and goes on
    cfg = SamplingConfig(model=str(chat_models["chat"]), chat=True, max_new_tokens=100)
    messages = chat_loop(model, tokenizer, cfg, io.StringIO("ka lo " * 20 + "\nka\n"),
                         io.StringIO(), io.StringIO())
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "ka"


def test_chat_loop_ctrl_c_stops_the_reply_not_the_chat(chat_models):
    import io

    from clm.sampling import chat_loop, load_model

    model, tokenizer = load_model(str(chat_models["chat"]), "cpu", "float32")
    real, calls = model.generate, []

    def generate(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(**kwargs)

    model.generate = generate
    cfg = SamplingConfig(model=str(chat_models["chat"]), chat=True, max_new_tokens=6)
    err = io.StringIO()
    messages = chat_loop(model, tokenizer, cfg, io.StringIO("ka lo\nmi ten\n"), io.StringIO(),
                         err)
    assert len(calls) == 2 and "reply stopped" in err.getvalue()
    assert [(m["role"], m["content"]) for m in messages][:1] == [("user", "mi ten")]
    assert len(messages) == 2


def test_chat_system_needs_a_template_with_a_system_role(chat_models):
    from transformers import AutoTokenizer

    from clm.config import UsageError
    from clm.sampling import new_chat

    tokenizer = AutoTokenizer.from_pretrained(chat_models["chat"])
    cfg = SamplingConfig(model="m", chat=True, system="be brief")
    assert new_chat(tokenizer, cfg) == [{"role": "system", "content": "be brief"}]
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                               "'System role not supported') }}{% endif %}" + CHATML)
    with pytest.raises(UsageError, match="--system: the chat template of m has no system role"):
        new_chat(tokenizer, cfg)


def test_chat_with_what_run_sft_wrote(lora, capsys):
    merged, adapters = lora
    for folder in (merged, adapters / "checkpoints" / "step-6"):  # plain and LoRA folders
        [reply] = chat(folder, "swap ka lo", do_sample="false")
        assert capsys.readouterr().out.strip() == reply
