"""Mixed precision as a GPU run gets it, on CPU: the logits reach the loss in the autocast dtype
through the same Accelerate prepare() (no fp32 copy), and the unwrapped model is plain again."""

import pytest
import torch

from clm import loop
from helpers import reset_accelerate, run, toy_args


def test_bf16_logits_reach_the_loss_through_prepare(tmp_path, corpus_dir, tokenizer_dir,
                                                    toy_config_dir, monkeypatch):
    seen = []
    real = loop.nll_sum

    def spy(logits, labels, chunk_rows=None):
        seen.append(logits.dtype)
        return real(logits, labels, chunk_rows)

    monkeypatch.setattr(loop, "nll_sum", spy)
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "bf16", max_steps=2,
                 eval_steps=0, num_samples=0, mixed_precision="bf16"))
    # before: Accelerate's convert_outputs_to_fp32 handed the loss an fp32 copy of the logits
    assert seen and set(seen) == {torch.bfloat16}, seen
    seen.clear()
    reset_accelerate()
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "fp32", max_steps=1,
                 eval_steps=0, num_samples=0))
    assert set(seen) == {torch.float32}


def test_prepared_model_autocasts_and_unwraps_to_its_plain_forward():
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from clm.parallel import Topology
    from clm.parallel.ddp import DDPBackend

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16,
                                       vocab_size=64, bos_token_id=0, eos_token_id=0))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    backend = DDPBackend(accelerator, Topology())
    prepared, _ = backend.prepare(model, torch.optim.AdamW(model.parameters()))
    ids = torch.randint(0, 64, (2, 8))
    assert prepared(input_ids=ids).logits.dtype == torch.bfloat16
    assert prepared.transformer.wte.weight.dtype == torch.float32, "fp32 masters"
    plain = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    assert plain(input_ids=ids).logits.dtype == torch.float32, "no autocast left behind"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_chunked_loss_runs_on_half_logits(precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    logits = torch.randn(64, 40).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (64,))
    nll = loop.nll_sum(logits, labels, chunk_rows=16)
    nll.backward()
    assert nll.dtype == torch.float32 and logits.grad.dtype == dtype


def test_fsdp_fp16_scales_skips_overflows_on_every_rank_and_survives_a_nan_loss(tmp_path):
    import json

    from helpers import torchrun

    torchrun(tmp_path, "tests/dist_fsdp_fp16_check.py", [tmp_path])
    ranks = [json.loads((tmp_path / f"fp16_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "every rank takes (or skips) the same steps"
    normal, overflow, nan_loss, after, logits = ranks[0]
    assert normal["stepped"] and normal["moved"]
    # an overflow on one rank's shard: no rank applies it (before: inf/nan weights on all)
    assert overflow["stepped"] and not overflow["moved"] and overflow["finite_weights"]
    assert overflow["scale"] == normal["scale"] / 2, "the scaler lowered its scale"
    # a non-finite loss: a bad step, skipped (before: AssertionError in scaler.update())
    assert not nan_loss["stepped"] and not nan_loss["moved"]
    assert after["stepped"] and after["moved"] and after["finite_weights"]
    assert logits["logits_dtype"] == "torch.float16"
