"""Finetuning: record formats and loss masks, the loader, errors, and the real run_sft main()."""

import ast
import json
import shutil
import sys

import pytest
import torch
import yaml

from clm import sft
from clm.config import ModelConfig, TrainingConfig, parse_config, run_cli
from clm.corpus import build_sft_records
from clm.task_eval import GenerationEvalConfig
from helpers import (ROOT, assert_folder_serves_users, assert_same_records, metrics, run,
                     torchrun, toy_args, world_of)

sys.path.insert(0, str(ROOT / "finetune"))
import run_sft  # noqa: E402

SFT_TYPES = [sft.SFTDataConfig, ModelConfig, TrainingConfig, sft.LoraArgs,
             GenerationEvalConfig]
CPU = torch.device("cpu")
WORDS = ["ka", "lo", "mi", "ten", "ra", "sol", "ve", "nu"]


def records(n=96):
    out = []
    for i in range(n):
        a, b = WORDS[i % 8], WORDS[(i * 3 + 1) % 8]
        if i % 3 == 0:
            out.append({"prompt": f"join {a} {b}:", "completion": f" {a}{b}"})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "user", "content": f"swap {a} {b}"},
                                     {"role": "assistant", "content": f"{b} {a}"}]})
        else:
            out.append({"text": f"{a} {b} {a} {b}"})
    return out


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def learned_text(tokenizer, example):
    return tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"])
                             if lab != -100])


def test_each_format_learns_only_its_completion(tokenizer):
    sft.ensure_chat_template(tokenizer)
    eos = tokenizer.eos_token
    pc = {"prompt": "join ka lo:", "completion": " kalo"}
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "swap ka lo"},
                         {"role": "assistant", "content": "lo ka"},
                         {"role": "user", "content": "again"},
                         {"role": "assistant", "content": "ka lo"}]}
    text = {"text": "ka lo mi"}
    (a, b, c), dropped = sft.tokenize([pc, chat, text], tokenizer, 256)
    assert dropped == 0
    assert learned_text(tokenizer, a) == f" kalo{eos}"
    assert tokenizer.decode(a["input_ids"]) == f"join ka lo: kalo{eos}"
    # both assistant turns, each with its end token; no system or user text, no role headers
    assert learned_text(tokenizer, b) == f"lo ka{eos}\nka lo{eos}\n"
    rendered = tokenizer.apply_chat_template(chat["messages"], tokenize=False)
    assert tokenizer.decode(b["input_ids"]) == rendered
    assert learned_text(tokenizer, c) == f"ka lo mi{eos}" == tokenizer.decode(c["input_ids"])
    (full,), _ = sft.tokenize([pc], tokenizer, 256, completion_only_loss=False)
    assert full["labels"] == full["input_ids"]


def test_special_token_text_in_records_is_plain_text(tokenizer):
    sft.ensure_chat_template(tokenizer)
    eos, quoted = tokenizer.eos_token_id, "ka <|endoftext|> lo"
    assert eos in tokenizer(quoted, add_special_tokens=False)["input_ids"], \
        "by default the tokenizer turns this text into an EOS id"
    pc = {"prompt": f"join {quoted}:", "completion": f" {quoted}"}
    text = {"text": quoted}
    # the data's own private-use characters must come back as themselves, too
    odd = "\ue000<|endoftext|>\ue001 \ue001"
    messages = [{"role": "user", "content": f"swap {quoted}"},
                {"role": "assistant", "content": quoted},
                {"role": "user", "content": odd},
                {"role": "assistant", "content": "<|endoftext|>"}]
    (a, b, c), dropped = sft.tokenize([pc, {"messages": messages}, text], tokenizer, 256)
    assert dropped == 0
    for example, ends in ((a, 1), (b, len(messages)), (c, 1)):
        ids = example["input_ids"]
        assert ids[-1] == eos or ids[-2] == eos  # the chat template writes "\n" after EOS
        assert ids.count(eos) == ends, "EOS only where the formatter puts it"
    assert tokenizer.decode(a["input_ids"]) == f"join {quoted}: {quoted}<|endoftext|>"
    assert learned_text(tokenizer, c) == f"{quoted}<|endoftext|>"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(b["input_ids"]) == rendered
    # the template's EOS ends each turn: one per message, right after its content
    chat = b["input_ids"]
    cuts = [i for i, t in enumerate(chat) if t == eos]
    turns = [tokenizer.decode(chat[lo:hi]) for lo, hi in zip([0] + [i + 1 for i in cuts], cuts)]
    assert [t.split("|>\n", 1)[1] for t in turns] == [m["content"] for m in messages]


def test_records_without_special_token_text_encode_as_before(tokenizer):
    sft.ensure_chat_template(tokenizer)
    recs = records(12)
    examples, _ = sft.tokenize(recs, tokenizer, 256, completion_only_loss=False)
    for record, example in zip(recs, examples):
        if "messages" in record:
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            want = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            parts = [record["prompt"], record["completion"]] if "prompt" in record \
                else [record["text"]]
            want = [t for p in parts
                    for t in tokenizer(p, add_special_tokens=False)["input_ids"]]
            want.append(tokenizer.eos_token_id)
        assert example["input_ids"] == want


def test_truncation_and_records_without_completion_left(tokenizer):
    long_prompt = {"prompt": " ".join(WORDS * 20), "completion": " ka"}
    kept, dropped = sft.tokenize([long_prompt, {"text": " ".join(WORDS * 20)}], tokenizer, 16)
    assert dropped == 1 and len(kept) == 1 and len(kept[0]["input_ids"]) == 16


def test_collate_pads_right_and_masks(tokenizer):
    batch = sft.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                         {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_loader_deals_disjoint_equal_shares_and_resumes_exactly():
    examples = [{"input_ids": [i, i], "labels": [i, i]} for i in range(22)]
    seen = []
    for rank in (0, 1):
        loader = sft.ExampleLoader(examples, 2, 0, seed=3, rank=rank, world_size=2)
        assert loader.batches_per_epoch == 5  # 11 a rank, batches of 2
        it = iter(loader)
        seen.append([int(x) for _ in range(5) for x in next(it)["input_ids"][:, 0]])
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == 10
    loader = sft.ExampleLoader(examples, 4, 0, seed=3)
    it = iter(loader)
    for _ in range(7):  # into the second epoch
        next(it)
    state = loader.state_dict()
    expected = [next(it)["input_ids"].tolist() for _ in range(6)]
    again = sft.ExampleLoader(examples, 4, 0, seed=3)
    again.load_state_dict(json.loads(json.dumps(state)))
    it = iter(again)
    assert [next(it)["input_ids"].tolist() for _ in range(6)] == expected


def test_packing_fills_rows_once_per_epoch_and_resumes_exactly():
    lengths = [3, 9, 4, 12, 2, 7, 5, 16, 6, 8, 3, 11, 2, 5, 9, 4] * 3
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(lengths)]
    rows = sft.pack(examples, 16, torch.Generator().manual_seed(0))
    assert sorted(e["input_ids"][0] for row in rows for e in row) == list(range(len(lengths)))
    assert all(sum(len(e["input_ids"]) for e in row) <= 16 for row in rows)
    # best-fit decreasing wastes little: 318 tokens need at least 20 rows of 16
    assert len(rows) <= 21
    batch = sft.collate_packed(rows[:2], pad_id=0)
    for r, row in enumerate(rows[:2]):
        starts = [0]
        for e in row:
            starts.append(starts[-1] + len(e["input_ids"]))
        for (a, b), e in zip(zip(starts, starts[1:]), row):
            assert batch["position_ids"][r, a:b].tolist() == list(range(b - a))
            assert batch["labels"][r, a] == -100, "no example predicts another's first token"
            assert batch["labels"][r, a + 1:b].tolist() == e["labels"][1:]
        assert batch["attention_mask"][r].sum() == starts[-1]
        assert (batch["labels"][r, starts[-1]:] == -100).all()
    loader = sft.ExampleLoader(examples, 4, 0, seed=1, packing_block_size=16)
    it = iter(loader)
    for _ in range(loader.batches_per_epoch + 1):  # into the second epoch
        next(it)
    state = loader.state_dict()
    expected = [next(it)["input_ids"].tolist() for _ in range(5)]
    again = sft.ExampleLoader(examples, 4, 0, seed=1, packing_block_size=16)
    again.load_state_dict(json.loads(json.dumps(state)))
    it = iter(again)
    assert [next(it)["input_ids"].tolist() for _ in range(5)] == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_have_the_losses_they_have_alone(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    from clm import loop

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64,
                                       vocab_size=96, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.set_attn_implementation(attn)
    examples = [{"input_ids": ids, "labels": [-100] * k + ids[k:]}
                for ids, k in [(torch.randint(1, 96, (n,)).tolist(), k)
                               for n, k in [(9, 3), (14, 0), (5, 2), (20, 6), (7, 1)]]]
    rows = sft.pack(examples, 32, torch.Generator().manual_seed(0))
    assert any(len(row) > 1 for row in rows)
    batch, labels, tokens = loop.prepare_batch(sft.collate_packed(rows, pad_id=0),
                                               torch.device("cpu"))
    assert "attention_mask" not in batch and tokens == sum(len(e["input_ids"]) for e in examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
        for r, row in enumerate(rows):
            at = 0
            for e in row:
                n = len(e["input_ids"])
                alone, alone_labels, _ = loop.prepare_batch(sft.collate([e], 0), CPU)
                assert per_token[r, at:at + n].sum().item() == pytest.approx(
                    loop.token_nll(model, alone).item(), rel=1e-5, abs=1e-5)
                at += n
        total_alone = sum(loop.token_nll(model, loop.prepare_batch(sft.collate([e], 0),
                                                                   CPU)[0]).item()
                          for e in examples)
        assert loop.token_nll(model, batch).item() == pytest.approx(total_alone, rel=1e-5)
    assert labels == sum(sum(x != -100 for x in e["labels"][1:]) for e in examples)


def test_demo_records_ask_for_parameter_names(tmp_path):
    summary = build_sft_records(tmp_path / "train.jsonl", max_records=40)
    recs = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert summary["records"] == len(recs) == 40
    assert sum("prompt" in r for r in recs) == sum("messages" in r for r in recs) == 20
    for r in recs:  # the answer is the signature's parameter names, in order
        signature = r["prompt"] if "prompt" in r else r["messages"][0]["content"]
        answer = r["completion"] if "prompt" in r else r["messages"][1]["content"]
        tree = ast.parse(signature[signature.index("def "):signature.index(":\n") + 1
                                   if ":\n" in signature else None] + " pass")
        args = tree.body[0].args
        expected = [a.arg for a in args.posonlyargs + args.args] + \
            (["*" + args.vararg.arg] if args.vararg else []) + \
            [a.arg for a in args.kwonlyargs] + (["**" + args.kwarg.arg] if args.kwarg else [])
        assert answer.strip() == ", ".join(expected)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_dir, tokenizer_dir, toy_config_dir):
    """A toy model folder written by train_clm.py, to finetune."""
    out = tmp_path_factory.mktemp("pre") / "model"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=4, eval_steps=0,
                 num_samples=0))
    return out


def sft_args(model, data, out, **kw):
    args = {"model_name_or_path": model, "train_files": data, "output_dir": out,
            "block_size": 48, "per_device_train_batch_size": 8, "max_steps": 12,
            "eval_steps": 6, "logging_steps": 1, "warmup_steps": 2, "learning_rate": 3e-3,
            "min_lr": 3e-4, "validation_split_percentage": 20, "num_samples": 1,
            "sample_max_new_tokens": 6, "seed": 0}
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run_sft_main(argv):
    return run_cli(run_sft.main, SFT_TYPES, argv)


def test_run_sft_end_to_end(tmp_path, pretrained):
    from transformers import pipeline

    data = write_jsonl(tmp_path / "records.jsonl", records())
    out = tmp_path / "sft"
    result = run_sft_main(sft_args(pretrained, data, out, save_steps=6))
    assert result["task"] == "sft" and result["train_examples"] + \
        result["heldout_examples"] == 96
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert cfg["model"]["model_name_or_path"] == str(pretrained)
    # AdamW stays SFT's optimizer: Moonlight saw no gain from Muon on an AdamW-pretrained model
    assert cfg["training"]["optim"] == "adamw_torch"
    card = (out / "README.md").read_text()
    assert "- sft" in card and f"| data | {data} |" in card
    assert (out / "chat_template.jinja").is_file(), "the chat template ships with the model"
    gen = pipeline("text-generation", str(out))
    assert gen("join ka lo:", max_new_tokens=3, do_sample=False)[0]["generated_text"]

    # exact resume from the step-6 checkpoint of a copy
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-12")
    run_sft_main(sft_args(pretrained, data, resumed, save_steps=6) +
                 ["--resume_from_checkpoint", "latest"])
    assert_same_records(metrics(resumed), metrics(out))


def test_packing_default_block_size_and_exact_match_from_step_0(tmp_path, pretrained, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "records.jsonl", records())
    out = tmp_path / "packed"
    argv = sft_args(pretrained, data, out, max_steps=6, eval_steps=3, num_samples=0)
    options = dict(zip(argv[::2], argv[1::2]))
    options.pop("--block_size")  # the model's context length, as HF's run_clm
    options.update({"--packing": "true", "--eval_metrics": "exact_match",
                    "--eval_generate_samples": "8", "--eval_max_new_tokens": "4"})
    result = run_sft_main([x for pair in options.items() for x in pair])
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    positions = json.loads((pretrained / "config.json").read_text())["n_positions"]
    assert cfg["data"]["block_size"] == min(positions, 1024) and cfg["data"]["packing"]
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0 <= r["eval_exact_match"] <= 1 for r in evals)
    assert result["final_eval"]["eval_exact_match"] == evals[-1]["eval_exact_match"]
    assert "held-out exact_match: " in capsys.readouterr().out

    # the final score, computed independently: each held-out prompt alone, greedy, unpadded
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    _, held = sft.split_records(sft.SFTDataConfig(train_files=[str(data)],
                                                  validation_split_percentage=20))
    hits = n = 0
    for record in held:
        pieces = sft.segments(record, tok)
        if len(pieces) < 2 or not pieces[-1][1]:
            continue
        ids = torch.tensor([[t for p, _ in pieces[:-1] for t in p]])
        new = model.generate(ids, max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        hits += tok.decode(new, skip_special_tokens=True).strip() == \
            tok.decode(pieces[-1][0], skip_special_tokens=True).strip()
        n += 1
        if n == 8:
            break
    assert evals[-1]["eval_exact_match"] == pytest.approx(hits / n)
    card = (out / "README.md").read_text()
    assert "exact_match" in card


def test_accumulation_is_exact_with_padding_and_masks(tmp_path, pretrained):
    data = write_jsonl(tmp_path / "records.jsonl", records())
    runs = {}
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        out = tmp_path / f"b{bs}"
        run_sft_main(sft_args(pretrained, data, out, per_device_train_batch_size=bs,
                              gradient_accumulation_steps=ga, max_steps=4, eval_steps=0,
                              num_samples=0))
        runs[bs] = [(r["loss"], r["grad_norm"]) for r in metrics(out) if "loss" in r]
    # the same 8 examples a step, padded differently: the same mean over completion tokens
    for bs in (4, 2):
        assert [x[0] for x in runs[bs]] == pytest.approx([x[0] for x in runs[8]], rel=1e-5)
        assert [x[1] for x in runs[bs]] == pytest.approx([x[1] for x in runs[8]], rel=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"model_name_or_path": None}, "finetuning needs --model_name_or_path"),
    ({"train_files": None}, "no finetuning data"),
    ({"per_device_train_batch_size": 200}, "cannot fill one batch of 200"),
    ({"bad_records": True}, "bad.jsonl line 1: the record has columns ['answer', 'question']"),
    ({"broken_json": True}, "broken.jsonl line 3: not valid JSON (Expecting value"),
    ({"bad_messages": True}, "chat.jsonl line 2: 'messages' must be a non-empty list"),
    ({"eval_metrics": "no_such_metric"}, "could not load --eval_metrics no_such_metric"),
    ({"eval_metrics": "exact_match", "text_only": True}, "--eval_metrics needs held-out records"),
    ({"block_size": 4096}, "--block_size 4096 is above the model's"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, pretrained, change, message):
    data = write_jsonl(tmp_path / "records.jsonl", records())
    if change.pop("bad_records", False):
        data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}] * 20)
    if change.pop("broken_json", False):
        data = tmp_path / "broken.jsonl"
        data.write_text('{"text": "a b"}\n\n{"prompt": "a", "completion": \n')
    if change.pop("bad_messages", False):
        data = write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "text": "hi"}]}])
    if change.pop("text_only", False):
        data = write_jsonl(tmp_path / "text.jsonl", [r for r in records() if "text" in r])
    base = sft_args(pretrained, data, tmp_path / "o")
    options = dict(zip(base[::2], base[1::2]))
    for key, value in change.items():
        options.pop(f"--{key}", None)
        if value is not None:
            options[f"--{key}"] = str(value)
    with pytest.raises(SystemExit) as e:
        run_sft_main([x for pair in options.items() for x in pair])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o").exists(), "nothing written"


def test_sft_demo_yaml_parses():
    data_cfg, model_cfg, train_cfg, _, _ = parse_config(SFT_TYPES, ["--config",
                                                              str(ROOT / "configs" / "sft_demo.yaml")])
    assert model_cfg.model_name_or_path == "outputs/demo" and data_cfg.completion_only_loss
    assert train_cfg.output_dir == "outputs/sft_demo"


@pytest.mark.slow
def test_two_process_sft_deals_each_global_batch_across_ranks(tmp_path, pretrained):
    data = write_jsonl(tmp_path / "records.jsonl", records())
    kw = dict(max_steps=4, eval_steps=4, num_samples=0)
    one = tmp_path / "one"
    run_sft_main(sft_args(pretrained, data, one, per_device_train_batch_size=8, **kw))
    two = tmp_path / "two"
    torchrun(tmp_path, "finetune/run_sft.py",
             sft_args(pretrained, data, two, per_device_train_batch_size=4, **kw))
    dist = yaml.safe_load((two / "run_config.yaml").read_text())["distributed"]
    assert dist["accelerate_num_processes"] == dist["torch_world_size"] == 2
    # each step's 8 examples are split 4 + 4 over the ranks, with no example on both: the
    # losses of one process taking all 8 are reproduced
    a = [r["loss"] for r in metrics(one) if "loss" in r]
    b = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-5)
    assert [r["tokens"] for r in metrics(two) if "loss" in r] == \
        [r["tokens"] for r in metrics(one) if "loss" in r]


def test_lora_trains_adapters_only_then_merges_and_exports(tmp_path, pretrained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from clm import export

    data = write_jsonl(tmp_path / "records.jsonl", records())
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    out = tmp_path / "lora"
    result = run_sft_main(sft_args(pretrained, data, out, max_steps=6, save_steps=6) + lora)
    assert 0 < result["trainable_params"] < result["model_info"]["params"] / 5
    base, tuned = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(tuned) == set(base), "the final folder is a plain model, adapters merged"
    assert torch.equal(tuned["transformer.wte.weight"], base["transformer.wte.weight"])
    assert not torch.equal(tuned["transformer.h.0.attn.c_attn.weight"],
                           base["transformer.h.0.attn.c_attn.weight"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    # the adapter folder carries the tokenizer and chat template it was trained with
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "adapter").chat_template == \
        AutoTokenizer.from_pretrained(out).chat_template is not None
    for folder in (out, out / "adapter"):
        assert_folder_serves_users(folder, positions=64)
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert evals[-1] < evals[0]
    exported = export.export(out / "checkpoints" / "step-6", tmp_path / "exported")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    unmerged = tmp_path / "unmerged"
    run_sft_main(sft_args(pretrained, data, unmerged, max_steps=6, num_samples=0) + lora +
                 ["--merge_adapters", "false"])
    assert (unmerged / "adapter_config.json").is_file()
    assert not (unmerged / "model.safetensors").exists()
    assert_folder_serves_users(unmerged, positions=64)
    with torch.no_grad():  # transformers loads an adapter folder through peft
        c = AutoModelForCausalLM.from_pretrained(unmerged).eval()(ids).logits
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--lora_target_modules", "nope"], "--lora_target_modules ['nope']: no such modules"),
])
def test_bad_lora_options_are_one_line_errors(tmp_path, capsys, pretrained, extra, message):
    data = write_jsonl(tmp_path / "records.jsonl", records())
    with pytest.raises(SystemExit) as e:
        run_sft_main(sft_args(pretrained, data, tmp_path / "o") + ["--use_peft", "true"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_adapters_name_their_base_by_absolute_path(pretrained, monkeypatch):
    from transformers import AutoModelForCausalLM

    from clm import sft

    monkeypatch.chdir(pretrained.parent)  # the base given relative to the working directory
    model = AutoModelForCausalLM.from_pretrained(pretrained.name)
    lora = sft.add_lora(model, sft.LoraArgs(use_peft=True, lora_r=2, lora_alpha=4))
    base = lora.peft_config["default"].base_model_name_or_path
    assert base == str(pretrained.resolve()), "loadable from any working directory"


# ----------------------------------------------------------------------------- another world
# A checkpoint of N processes resumed on M: each saved rank's unconsumed rest of its epoch is
# dealt to the new ranks (ExampleLoader.restore). Ranks are simulated in one process: one loader
# per rank, their states round-tripped through JSON as checkpoint.load_checkpoint reads them.

RESHARD_SEED, PACK_BLOCK = 5, 16


def distinct_examples(n=61):
    """Example i is a run of token i + 1 (pad is 0): any of its tokens names it."""
    lengths = [3, 9, 4, 12, 2, 7, 5, 16, 6, 8, 3, 11, 2, 5, 9, 4] * 4
    return [{"input_ids": [i + 1] * k, "labels": [i + 1] * k} for i, k in enumerate(lengths[:n])]


def examples_in(batch) -> list[int]:
    """The examples of a collated batch by their token, in order (packed rows: by segment)."""
    if "position_ids" not in batch:
        return [int(x) for x in batch["input_ids"][:, 0]]
    starts = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
    return [int(x) for x in batch["input_ids"][starts]]


def rank_loaders(examples, world, size, packing):
    return [sft.ExampleLoader(examples, size, 0, RESHARD_SEED, rank=r, world_size=world,
                              packing_block_size=packing) for r in range(world)]


def consume(iterators, k) -> list[int]:
    """k micro-batches from each rank; the examples they held."""
    return [i for it in iterators for _ in range(k) for i in examples_in(next(it))]


def saved(loaders) -> list[dict]:
    return json.loads(json.dumps([x.state_dict() for x in loaders]))


def dealt(examples, epoch, world) -> set[int]:
    """The examples `world` ranks are dealt in `epoch` (the loader's own permutation)."""
    probe = sft.ExampleLoader(examples, 1, 0, RESHARD_SEED, world_size=world)
    return {i + 1 for r in range(world) for i in probe._order(epoch, r, world)}


def tail_bound(world, size, packing) -> int:
    """The docstring's bound on examples skipped at a (re-dealt) epoch's end: the shares made
    equal, and on each rank fewer than `size` examples, or packed rows (an example has at
    least 2 tokens, so a row holds at most PACK_BLOCK / 2)."""
    return world - 1 + world * (size - 1) * (PACK_BLOCK // 2 if packing else 1)


def same_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def finish_rest(loaders, examples, size, packing, next_epoch) -> list[list[int]]:
    """Each new rank's examples for the rest of the epoch (from its share, each at most as
    often as it is there); then its next epoch must be a fresh loader's of that rank and world."""
    from collections import Counter

    got, world = [], len(loaders)
    for rank, loader in enumerate(loaders):
        share = Counter(i + 1 for i in loader.state_dict()["rest"])
        it, n = iter(loader), loader.batches_per_epoch
        done = loader.state_dict()["batch"]
        mine = [i for _ in range(n - done) for i in examples_in(next(it))]
        assert loader.state_dict()["epoch"] == next_epoch - 1
        assert Counter(mine) <= share
        left = (share - Counter(mine)).total()  # the rank's tail that fills no micro-batch
        assert left < size if not packing else left <= (size - 1) * PACK_BLOCK // 2
        got.append(mine)
        fresh = sft.ExampleLoader(examples, size, 0, RESHARD_SEED, rank=rank, world_size=world,
                                  packing_block_size=packing)
        fresh.load_state_dict({"epoch": next_epoch, "batch": 0})
        ahead = iter(fresh)
        for _ in range(fresh.batches_per_epoch):  # the whole next epoch
            same_batches(next(it), next(ahead))
        assert "rest" not in loader.state_dict()
    return got


@pytest.mark.parametrize("packing", [None, PACK_BLOCK], ids=["padded", "packed"])
@pytest.mark.parametrize("before, after, size", [(2, 1, 2), (1, 2, 2), (2, 3, 2),
                                                 (2, 1, 4), (2, 2, 1)])
def test_loader_deals_the_rest_of_the_epoch_to_another_number_of_ranks(before, after, size,
                                                                       packing):
    examples = distinct_examples()
    old = rank_loaders(examples, before, 2, packing)
    consumed = consume([iter(x) for x in old], 2)
    states = saved(old)
    assert all(s["epoch"] == 0 and "rest" not in s for s in states)
    new = rank_loaders(examples, after, size, packing)
    lines = {x.restore(states) for x in new}
    epoch = dealt(examples, 0, before)
    left = len(epoch) - len(consumed)
    procs = lambda n: f"{n} process{'es' if n != 1 else ''}"  # noqa: E731
    assert lines == {f"data: the rest of epoch 0 on {procs(before)}, {left} examples, is dealt "
                     f"to {procs(after)} ({left // after} each); then epoch 1 starts"}
    shares = [x.state_dict()["rest"] for x in new]
    assert all(len(s) == left // after for s in shares), "equal shares"
    flat = [i + 1 for s in shares for i in s]
    assert len(flat) == len(set(flat)), "the new ranks' rests are disjoint"
    assert not set(flat) & set(consumed) and set(flat) <= epoch
    assert len(consumed) + len(flat) > len(epoch) - after, "only the equal-share truncation"
    got = finish_rest(new, examples, size, packing, next_epoch=1)
    trained = consumed + [i for mine in got for i in mine]
    assert len(trained) == len(set(trained)), "no example twice in the epoch"
    assert set(trained) <= epoch
    assert len(epoch - set(trained)) <= tail_bound(after, size, packing)


@pytest.mark.parametrize("packing", [None, PACK_BLOCK], ids=["padded", "packed"])
def test_exact_resume_in_the_middle_of_a_dealt_rest(packing):
    examples = distinct_examples()
    old = rank_loaders(examples, 2, 2, packing)
    consume([iter(x) for x in old], 2)
    new = rank_loaders(examples, 3, 2, packing)
    for x in new:
        x.restore(saved(old))
    its = [iter(x) for x in new]
    consume(its, 1)
    middle = saved(new)
    assert all(s["batch"] == 1 and s["epoch"] == 0 and s["rest"] for s in middle)
    # through the end of the rest and into the next epoch
    expected = [[next(it) for _ in range(x.batches_per_epoch + 2)] for x, it in zip(new, its)]
    again = rank_loaders(examples, 3, 2, packing)
    assert [x.restore(middle) for x in again] == [None] * 3
    assert saved(again) == middle
    for x, want in zip(again, expected):
        it = iter(x)
        for batch in want:
            same_batches(next(it), batch)


@pytest.mark.parametrize("packing", [None, PACK_BLOCK], ids=["padded", "packed"])
@pytest.mark.parametrize("second", [1, 2, 4])
def test_second_reshard_from_the_middle_of_a_dealt_rest(packing, second):
    examples = distinct_examples()
    old = rank_loaders(examples, 2, 2, packing)
    trained = consume([iter(x) for x in old], 2)
    middle = rank_loaders(examples, 3, 2, packing)
    for x in middle:
        x.restore(saved(old))
    trained += consume([iter(x) for x in middle], 1)
    states = saved(middle)
    new = rank_loaders(examples, second, 2, packing)
    lines = {x.restore(states) for x in new}
    assert len(lines) == 1 and lines.pop().startswith("data: the rest of epoch 0 on 3 processes")
    got = finish_rest(new, examples, 2, packing, next_epoch=1)
    trained += [i for mine in got for i in mine]
    epoch = dealt(examples, 0, 2)
    assert len(trained) == len(set(trained)) and set(trained) <= epoch
    # the first re-deal's truncation, then the second's tail (each rest's tail is handed on)
    assert len(epoch - set(trained)) <= 3 - 1 + tail_bound(second, 2, packing)


def test_loader_states_of_older_checkpoints_still_load():
    examples = distinct_examples()
    old = rank_loaders(examples, 2, 2, None)
    its = [iter(x) for x in old]
    consume(its, 3)
    states = saved(old)
    assert states[0] == {"epoch": 0, "batch": 3, "batch_size": 2, "seed": 5}
    bare = [{"epoch": s["epoch"], "batch": s["batch"]} for s in states]  # as saved before
    again = rank_loaders(examples, 2, 2, None)
    assert [x.restore(bare) for x in again] == [None, None]
    for x, it in zip(again, its):
        mine = iter(x)
        for _ in range(6):  # into the next epoch
            same_batches(next(mine), next(it))
    for world in (1, 3):
        a, b = rank_loaders(examples, world, 2, None), rank_loaders(examples, world, 2, None)
        assert [x.restore(bare) for x in a] == [y.restore(states) for y in b]
        assert saved(a) == saved(b)


def test_packed_ranks_in_different_epochs_hand_over_all_they_had_left():
    """With packing, ranks pack different numbers of rows, so after a while one rank is in
    the next epoch while another is not: the rest is that of the newest epoch, and the rank
    behind hands over the rest of its epoch as well as its share of the newest one."""
    examples = distinct_examples()
    old = rank_loaders(examples, 2, 1, PACK_BLOCK)
    its = [iter(x) for x in old]
    seen = [[], []]  # each rank's (epoch, examples) per micro-batch
    while len({x.state_dict()["epoch"] for x in old}) == 1:  # in step, as the ranks train
        for r, it in enumerate(its):
            batch = examples_in(next(it))
            seen[r].append((old[r].state_dict()["epoch"], batch))
    states = saved(old)
    newest = max(s["epoch"] for s in states)
    ahead = [s["epoch"] for s in states].index(newest)
    behind = 1 - ahead
    assert newest >= 1 and states[behind]["epoch"] == newest - 1
    new = rank_loaders(examples, 1, 1, PACK_BLOCK)
    line = new[0].restore(states)
    assert line.startswith(f"data: the rest of epoch {newest} on 2 processes")
    rest = [i + 1 for i in new[0].state_dict()["rest"]]
    trained = lambda r, e: {i for epoch, b in seen[r] if epoch == e for i in b}  # noqa: E731
    share = lambda e: {i + 1 for i in old[behind]._order(e, behind, 2)}  # noqa: E731
    # an example twice in the rest only if it is left of both epochs
    twice = {i for i in rest if rest.count(i) > 1}
    assert all(rest.count(i) == 2 for i in twice)
    assert twice == (share(newest - 1) - trained(behind, newest - 1)) & \
        (dealt(examples, newest, 2) - trained(ahead, newest))
    # the rank behind: its share of its epoch not trained yet, and all of the newest epoch's
    assert share(newest - 1) - trained(behind, newest - 1) <= set(rest)
    assert share(newest) <= set(rest)
    assert not trained(ahead, newest) & set(rest), "what the rank ahead trained is not repeated"
    assert len(rest) == len(dealt(examples, newest, 2) - trained(ahead, newest)) + \
        len(share(newest - 1) - trained(behind, newest - 1))
    # the rest of the newest epoch, then the epoch after it as a fresh single rank's
    finish_rest(new, examples, 1, PACK_BLOCK, next_epoch=newest + 1)


@pytest.mark.slow
def test_two_process_sft_resumes_on_one_process(tmp_path, pretrained, capsys):
    data = write_jsonl(tmp_path / "records.jsonl", records())
    kw = dict(per_device_train_batch_size=4, max_steps=12, save_steps=6, eval_steps=6,
              num_samples=0)
    full = tmp_path / "two"
    torchrun(tmp_path, "finetune/run_sft.py", sft_args(pretrained, data, full, **kw))
    assert world_of(full) == (2, 2)
    middle = full / "checkpoints" / "step-6"
    states = [json.loads((middle / "state" / f"data_rank{r}.json").read_text()) for r in (0, 1)]
    assert states == [{"epoch": 0, "batch": 6, "batch_size": 4, "seed": 0}] * 2

    # resumed in this process, on 1: the command line keeps the 2-process accumulation
    capsys.readouterr()
    moved = tmp_path / "one"
    run_sft_main(sft_args(pretrained, data, moved, **kw) +
                 ["--resume_from_checkpoint", str(middle)])
    out = capsys.readouterr().out
    assert out.count("--gradient_accumulation_steps 1 -> 2 keeps its global batch of 8") == 1
    assert out.count("data: the rest of epoch 0 on 2 processes, ") == 1
    assert "is dealt to 1 process (" in out
    assert world_of(moved) == (1, 1) and (moved / "model.safetensors").is_file()
    cfg = {name: yaml.safe_load((o / "run_config.yaml").read_text()) for name, o in
           (("full", full), ("moved", moved))}
    assert cfg["moved"]["training"]["gradient_accumulation_steps"] == 2
    assert cfg["full"]["global_batch_sequences"] == cfg["moved"]["global_batch_sequences"] == 8
    train = {name: {r["step"]: r for r in metrics(o) if "loss" in r} for name, o in
             (("full", full), ("moved", moved))}
    assert sorted(train["moved"]) == list(range(1, 13))  # steps 1-6 carried over
    # The two ranks saw disjoint data: each step of the rest of epoch 0 took rank 0's 4 and
    # rank 1's 4 examples, and the one process, dealt what both had left in the epoch's
    # order, takes the same 8 a step: the same losses and tokens. Then the epochs differ.
    per_rank = cfg["full"]["train_examples"] // 2
    last = per_rank // 4  # the last step of epoch 0 for the 2-process run
    assert last >= 8
    for step in range(7, last + 1):
        a, b = train["full"][step], train["moved"][step]
        assert a["tokens"] == b["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    final = {name: [r["eval_loss"] for r in metrics(o) if "eval_loss" in r][-1]
             for name, o in (("full", full), ("moved", moved))}
    assert abs(final["moved"] - final["full"]) <= 0.01 * final["full"], final
