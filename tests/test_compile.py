"""--torch_compile on the real entry point: each transformer block compiled once, no
recompilation and no graph break over training steps interleaved with evaluation, HellaSwag
and sampling; bf16 logits reach the loss; the compiled run learns as the eager one does."""

import json

import pytest
import torch

import train_clm
from clm import model as models
from clm.config import run_cli
from clm.evaluate import BenchmarkEvalConfig
from helpers import TYPES, metrics, toy_args

HELLASWAG = [{"ctx": "doc1 the ka lo", "endings": ["mi ten", "ra sol", "ve nu", "dor pa"],
              "label": 0},
             {"ctx": "doc2 is the an", "endings": ["e ka lo mi", "ten", "ra sol ve", "nu"],
              "label": 2}]


@pytest.fixture
def dynamo_counts():
    """Dynamo's counters, from zero, with recompilation made an error for the run."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(error_on_recompile=True):
        yield counters
    dynamo.reset()


def test_compiled_bf16_run_never_recompiles_or_breaks(tmp_path, corpus_dir, tokenizer_dir,
                                                      toy_config_dir, dynamo_counts):
    tasks = tmp_path / "hellaswag.jsonl"
    tasks.write_text("".join(json.dumps(e) + "\n" for e in HELLASWAG))
    out = tmp_path / "run"
    # evaluation at steps 0, 2, 4, 6 (batch 8, no grad), HellaSwag each time (padded rows of
    # other lengths), 2 samples at the end (a growing KV cache), between compiled train steps;
    # with activation checkpointing, whose backward runs the compiled blocks again
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=6, eval_steps=2,
                    torch_compile=True, mixed_precision="bf16", num_samples=2,
                    gradient_checkpointing=True)
    run_cli(train_clm.main, TYPES + [BenchmarkEvalConfig],
            argv + ["--eval_tasks", "hellaswag", "--eval_tasks_data_files", str(tasks)])
    assert dict(dynamo_counts["graph_break"]) == {}, "no graph break"
    # one graph for the blocks (shared by both), the loss's forward: nothing recompiled (that
    # would have raised), nothing else compiled
    assert dynamo_counts["stats"]["unique_graphs"] <= 3, dict(dynamo_counts["stats"])
    records = metrics(out)
    assert sum("eval_hellaswag_acc_norm" in r for r in records) == 4
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4, 6]
    assert (out / "samples.txt").read_text().strip()


def test_compile_blocks_compiles_each_block_in_place(toy_config_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config.from_pretrained(toy_config_dir))
    names = list(model.state_dict())
    models.compile_blocks(model)
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    assert model._compiled_call_impl is None, "the model itself stays eager"
    assert list(model.state_dict()) == names, "no _orig_mod. in saved names"
    with models.eager():  # runs without compiling anything
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        assert counters["stats"]["unique_graphs"] == before


def test_compiled_bf16_sft_with_packing_and_padding_trains(tmp_path, corpus_dir, tokenizer_dir,
                                                           toy_config_dir):
    """Finetuning's masked batches (padded rows; packed examples) compile and learn too."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from helpers import reset_accelerate, run
    from test_sft import records, run_sft_main, sft_args, write_jsonl

    pre = tmp_path / "pre"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, pre, max_steps=2, eval_steps=0,
                 num_samples=0))
    data = write_jsonl(tmp_path / "records.jsonl", records())
    for packing in ("false", "true"):
        reset_accelerate()
        dynamo.reset()
        counters.clear()
        out = tmp_path / f"sft_{packing}"
        run_sft_main(sft_args(pre, data, out, max_steps=4, eval_steps=2, num_samples=1,
                              torch_compile="true", mixed_precision="bf16", packing=packing))
        evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
        assert len(evals) == 3 and evals[-1] < evals[0], evals
        assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    dynamo.reset()


def test_compiled_bf16_muon_run_steps_outside_the_graphs(tmp_path, corpus_dir, tokenizer_dir,
                                                         toy_config_dir, dynamo_counts):
    """--optim muon with --torch_compile and bf16: Muon's Newton-Schulz runs eagerly in the
    optimizer step, after the compiled blocks' backward, and breaks or recompiles nothing."""
    out = tmp_path / "run"
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=4, eval_steps=4,
                    torch_compile=True, mixed_precision="bf16", num_samples=0)
    run_cli(train_clm.main, TYPES, argv + ["--optim", "muon"])
    assert dict(dynamo_counts["graph_break"]) == {}, "no graph break"
    assert dynamo_counts["stats"]["unique_graphs"] <= 3, dict(dynamo_counts["stats"])
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
