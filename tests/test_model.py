"""MFU's two halves without a GPU: the peak FLOP/s looked up by device name (clm.metrics), and the
model's FLOPs per token as the loop turns them into a logged MFU."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clm import loop
from clm.metrics import MetricsLogger, peak_flops, peak_flops_of, read_metrics
from clm.model import flops_per_token, num_params
from clm.parallel import Topology

# Names as `torch.cuda.get_device_name` reports them; dense bf16 tensor-core peaks from the
# datasheets (their sparse figures halved).
KNOWN = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10G": 125e12,
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_peak_of_each_known_gpu(name):
    assert peak_flops_of(name) == KNOWN[name]


def test_near_names_do_not_borrow_a_neighbours_peak():
    # "L4" is part of "L40S", "H100" of every H100 board
    assert (peak_flops_of("NVIDIA L4"), peak_flops_of("NVIDIA L40S")) == (121e12, 362e12)
    h100 = {peak_flops_of(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
                                       "NVIDIA H100 NVL")}
    assert h100 == {989e12, 756e12, 835e12}


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA L40S 48GB", "NVIDIA L4X",
                                  "NVIDIA GeForce RTX 3090", "Tesla V100-SXM2-16GB",
                                  "NVIDIA H800", "H100", "L4", ""])
def test_unknown_gpu_has_no_peak(name):
    assert peak_flops_of(name) is None


def test_peak_of_a_device_goes_by_its_name(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    names = {0: "NVIDIA L40S", 1: "NVIDIA RTX PRO 6000"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: names[d.index])
    assert peak_flops(torch.device("cuda", 0)) == 362e12
    assert peak_flops(torch.device("cuda", 1)) is None


def tiny_gpt2(**kwargs):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=448,
                        **kwargs)
    return GPT2LMHeadModel(config)


# Per block: ln_1 2d + c_attn (d*3d + 3d) + attn c_proj (d*d + d) + ln_2 2d + c_fc (d*4d + 4d)
# + mlp c_proj (4d*d + d) = 12d^2 + 13d = 12*4096 + 832 = 49_984; two blocks and ln_f (2d):
# 2*49_984 + 128 = 100_096 parameters besides the token and position embeddings.
NON_EMBEDDING = 100_096
# 6 per weight: 6 * 100_096 = 600_576, the d x vocab output projection 6 * 64 * 448 = 172_032,
# attention (scores and weighted sum, 12 * L * d * T) 12 * 2 * 64 * 32 = 49_152.
FLOPS_PER_TOKEN_T32 = 600_576 + 172_032 + 49_152  # 821_760


def test_flops_per_token_by_hand():
    model = tiny_gpt2()
    assert num_params(model, non_embedding=True) == NON_EMBEDDING
    assert flops_per_token(model, 32) == FLOPS_PER_TOKEN_T32 == 821_760
    # the attention term grows with the context: 12 * 2 * 64 per extra position
    assert flops_per_token(model, 64) - flops_per_token(model, 32) == 12 * 2 * 64 * 32


def test_an_untied_head_is_counted_once():
    untied = tiny_gpt2(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert flops_per_token(untied, 32) == FLOPS_PER_TOKEN_T32


def logged_window(monkeypatch, tmp_path, peak, world=1) -> dict:
    """The record, as metrics.jsonl holds it, of a window that read 4096 tokens (all ranks) in
    2 s, logged by the MetricsLogger the session makes."""
    clock = [100.0, 102.0]  # opened at 100 s, logged at 102 s (and after)
    monkeypatch.setattr(loop.time, "perf_counter",
                        lambda: clock.pop(0) if len(clock) > 1 else clock[0])
    window = loop._Window()
    window.add(nll=1.0, labels=4000, tokens=4096, finite=True)
    backend = SimpleNamespace(topology=Topology(world_size=world), device=torch.device("cpu"))
    accelerator = SimpleNamespace(is_main_process=True, log=lambda *a, **k: None)
    logger = MetricsLogger(tmp_path, accelerator, max_steps=1, flops_per_token=FLOPS_PER_TOKEN_T32,
                           peak_flops=peak, devices=world)
    logger.log_train(window.record(loop.LoopState(step=1, tokens=4096), 1e-3, 1.0, backend))
    logger.close()
    (record,) = read_metrics(tmp_path, "train")
    return record


@pytest.mark.parametrize("world", [1, 2])
def test_logged_mfu_by_hand(monkeypatch, tmp_path, world):
    record = logged_window(monkeypatch, tmp_path, 4e9, world)
    # 4096 tokens / 2 s = 2048 tokens/s of 821_760 FLOPs each = 1.68e9 FLOP/s, shared by
    # `world` devices of 4e9 FLOP/s peak: 0.42074112 for one, 0.21037056 for two
    assert record["tokens_per_sec"] == 2048.0
    assert record["mfu"] == {1: 0.4207, 2: 0.2104}[world]


def test_no_peak_no_mfu(monkeypatch, tmp_path):
    assert logged_window(monkeypatch, tmp_path, None)["mfu"] is None
