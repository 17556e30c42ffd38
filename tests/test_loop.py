"""The loop's pieces: loss on shifted labels, chunked fp32 loss, host-side counts, the GPU-path
decisions (fused AdamW, flash attention, TF32) taken on CPU, and the logged loss window."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clm import attention, loop, optim, runtime
from clm.config import TrainingConfig
from clm.parallel import Topology
from clm.parallel.ddp import DDPBackend
from helpers import metrics, run, toy_args


def toy_model(vocab=50, attn="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=vocab,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation(attn)
    return model


def test_chunked_loss_equals_plain_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(50, 37) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 37, (50,))
    labels[::7] = -100
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    plain = F.cross_entropy(a.float(), labels, ignore_index=-100, reduction="sum")
    chunked = loop.nll_sum(b, labels, chunk_rows=8)  # 7 chunks, the last one short
    plain.backward()
    chunked.backward()
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.equal(a.grad, b.grad), "each row's gradient is computed the same way"
    # fp32 logits take the plain path (no copy, no recompute)
    x = torch.randn(10, 5)
    assert loop.nll_sum(x, torch.arange(10) % 5, chunk_rows=2).item() == pytest.approx(
        F.cross_entropy(x, torch.arange(10) % 5, reduction="sum").item(), rel=1e-6)


def test_compiled_loss_equals_the_eager_one_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(64, 37) * 3
    labels = torch.randint(0, 37, (64,))
    labels[::5] = -100
    grads, values = [], []
    try:
        for compiled in (False, True):
            loop.compile_loss(compiled)
            x = logits.clone().requires_grad_()
            nll = loop.nll_sum(x, labels)
            nll.backward()
            values.append(nll.item())
            grads.append(x.grad)
    finally:
        loop.compile_loss(False)
    assert loop._chunk_nll_fn is loop._chunk_nll
    # one reduction order against another: float32 rounding, not a different loss
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert grads[0][::5].abs().max() == 0 and grads[1][::5].abs().max() == 0


def test_shifted_labels_give_the_loss_of_shifted_logits():
    model = toy_model()
    ids = torch.randint(1, 50, (3, 16))
    labels = ids.clone()
    labels[0, :5] = -100  # e.g. a prompt without loss
    mask = torch.ones_like(ids)
    batch, n_labels, n_tokens = loop.prepare_batch(
        {"input_ids": ids, "attention_mask": mask, "labels": labels}, torch.device("cpu"))
    assert "attention_mask" not in batch, "a mask without padding is dropped"
    assert n_labels == int((labels[:, 1:] != -100).sum()) and n_tokens == ids.numel()
    assert batch["labels"][:, -1].eq(-100).all() and torch.equal(batch["labels"][:, :-1],
                                                                 labels[:, 1:])
    logits = model(input_ids=ids, use_cache=False).logits
    old = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                          ignore_index=-100, reduction="sum")
    assert loop.token_nll(model, batch).item() == pytest.approx(old.item(), rel=1e-6)
    padded = mask.clone()
    padded[1, -3:] = 0
    batch, _, n_tokens = loop.prepare_batch(
        {"input_ids": ids, "attention_mask": padded, "labels": labels}, torch.device("cpu"))
    assert torch.equal(batch["attention_mask"], padded) and n_tokens == ids.numel() - 3


def test_packed_batches_reach_sdpa_unmasked_and_causal(monkeypatch):
    """What lets SDPA pick its flash kernel on a GPU: no mask tensor, is_causal=True."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = toy_model()
    ids = torch.randint(1, 50, (2, 16))
    batch, _, _ = loop.prepare_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                      "labels": ids}, torch.device("cpu"))
    loop.token_nll(model, batch)
    assert seen == [(True, True)] * 2


def test_fused_adamw_is_chosen_for_cuda_and_cpu_before_prepare():
    from accelerate.utils import DistributedType

    from clm.parallel import Choice, make_backend

    def fused(device, kind=DistributedType.NO, ds=None):
        plugin = SimpleNamespace(deepspeed_config=ds or {})
        accel = SimpleNamespace(device=torch.device(device), distributed_type=kind,
                                state=SimpleNamespace(deepspeed_plugin=plugin))
        choice = Choice("deepspeed" if kind == DistributedType.DEEPSPEED else "ddp")
        return make_backend(choice, accel, Topology()).fused_optimizer()

    assert fused("cuda") is True
    assert fused("cuda", DistributedType.MULTI_GPU) is True
    assert fused("cpu") is True  # torch has a fused CPU kernel
    assert fused("cpu", DistributedType.DEEPSPEED) is False
    assert fused("mps") is False
    assert fused("cuda", DistributedType.DEEPSPEED, {"zero_optimization": {"stage": 2}}) is True
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert fused("cuda", DistributedType.DEEPSPEED, offload) is False
    # the parameters are still on the CPU when the optimizer is built: the flag is kept
    opt = optim.make_optimizer(toy_model(), TrainingConfig(output_dir="x"), fused=True)
    assert opt.defaults["fused"] is True


def test_gpu_math_settings_and_attention_choice_on_cpu():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        runtime.configure_cuda_math(cuda=False)
        assert not torch.backends.cuda.matmul.allow_tf32
        runtime.configure_cuda_math(cuda=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    # CPU: SDPA picks its own kernel; nothing is restricted or probed
    assert attention.choose_attention(torch.device("cpu"), "bf16", "sdpa", 64) is None
    with attention.sdpa_backends():
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_attention_is_used_on_cuda():
    from torch.nn.attention import SDPBackend

    chosen = attention.choose_attention(torch.device("cuda"), "bf16", "sdpa", 64)
    assert chosen == [SDPBackend.FLASH_ATTENTION]
    model = toy_model().cuda()
    ids = torch.randint(1, 50, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loop.token_nll(model, {"input_ids": ids, "labels": ids})  # flash only: errors otherwise


def test_logged_loss_is_the_token_weighted_mean_since_the_last_log(
        tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    every, third = tmp_path / "every", tmp_path / "third"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, every, max_steps=6, eval_steps=0,
                 num_samples=0, logging_steps=1))
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, third, max_steps=6, eval_steps=0,
                 num_samples=0, logging_steps=3))
    steps = [r for r in metrics(every) if "loss" in r]
    logged = [r for r in metrics(third) if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for record, window in zip(logged, (steps[:3], steps[3:])):
        # packed blocks: every step has the same number of label tokens
        assert record["loss"] == pytest.approx(sum(r["loss"] for r in window) / 3, rel=1e-12)
        assert record["grad_norm"] == window[-1]["grad_norm"]
        assert record["tokens"] == window[-1]["tokens"]
        assert 0 <= record["data_wait"] < 1
    assert len({r["loss"] for r in steps}) == 6, "each step's own loss with --logging_steps 1"


def fp16_scaled_accelerator(init_scale=1024.0):
    """An Accelerator whose optimizer steps go through a GradScaler, as fp16 on CUDA does.
    Accelerate gives CPUs no scaler, so one is put in place before prepare()."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"  # what unscale_gradients() checks
    return accelerator


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_fp16_skipped_step_does_not_break_the_next_and_norm_is_unscaled(tmp_path, max_grad_norm):
    accelerator = fp16_scaled_accelerator()
    assert accelerator.mixed_precision == "fp16"
    cfg = TrainingConfig(output_dir=str(tmp_path), max_grad_norm=max_grad_norm,
                         mixed_precision="no")
    model = toy_model()
    optimizer = optim.make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    backend = DDPBackend(accelerator, Topology())
    ids = torch.randint(1, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def true_norm():  # of the loss actually minimised, from an unscaled backward of a copy
        import copy

        clone = copy.deepcopy(accelerator.unwrap_model(model))
        prepared, n_labels, _ = loop.prepare_batch(batch, torch.device("cpu"))
        (loop.token_nll(clone, prepared) / n_labels).backward()
        return torch.stack([p.grad.norm() for p in clone.parameters()]).norm().item()

    # a step whose loss is not finite is skipped...
    sums = loop.forward_backward(model, [batch], backend)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sums[0] = float("inf")
    finite = loop._optimizer_step(backend, model, optimizer, cfg, sums).stepped
    assert not finite and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert accelerator.scaler.get_scale() == 1024.0, "the gradients were finite: no overflow"
    # ...and the next one steps (before the fix: "unscale_() has already been called")
    expected = true_norm()
    sums = loop.forward_backward(model, [batch], backend)
    _, _, _, grad_norm, finite, _ = loop._optimizer_step(backend, model, optimizer, cfg, sums)
    assert finite and not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert grad_norm == pytest.approx(expected, rel=1e-4), "the norm of unscaled gradients"


@pytest.mark.slow
def test_one_host_sync_per_optimizer_step(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir,
                                          monkeypatch):
    """One value read from the device per step (the step's sums with the gradient norm), on
    one process and under 2-process DDP (where the stop flag used to be a second)."""
    from helpers import HostReads, ROOT, torchrun

    reads = HostReads()
    reads.install(monkeypatch.setattr)
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "one", max_steps=4,
                 eval_steps=2, save_steps=2, num_samples=0, gradient_accumulation_steps=2))
    assert reads.per_step == [1] * 4
    out = tmp_path / "ddp"
    torchrun(tmp_path, "tests/dist_sync_check.py",
             toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=3, eval_steps=0,
                      num_samples=0))
    for rank in (0, 1):
        assert json.loads((out / f"host_reads_{rank}.json").read_text()) == [1] * 3
    assert (ROOT / "tests/dist_sync_check.py").is_file()


def test_host_tensors_reach_cuda_pinned_and_without_waiting(monkeypatch):
    """A copy from pageable host memory to CUDA waits for the device; loop.to_device pins."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: calls.append("pin") or self.clone())
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, device, non_blocking=False: calls.append(
                            (str(device), non_blocking)) or self)
    loop.to_device(torch.zeros(3), torch.device("cuda"))
    assert calls == ["pin", ("cuda", True)]
    calls.clear()
    loop.prepare_batch({"input_ids": torch.ones(2, 4, dtype=torch.long),
                        "attention_mask": torch.ones(2, 4, dtype=torch.long),
                        "labels": torch.ones(2, 4, dtype=torch.long)}, torch.device("cuda"))
    assert calls == ["pin", ("cuda", True)] * 2  # input ids and labels (the mask is dropped)


class EasyThenHard:
    """Endless batches of one repeated cyclic sequence (learned in a few steps), except a batch
    of random tokens at step `hard`: a loss spike there and nowhere else."""

    def __init__(self, block: int, hard: int, vocab: int = 300):
        self.block, self.hard, self.vocab, self.step = block, hard, vocab, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        easy = (torch.arange(self.block) % 7 + 10).repeat(4, 1)
        while True:
            self.step += 1
            x = torch.randint(self.vocab, (4, self.block), generator=gen) \
                if self.step == self.hard else easy.clone()
            yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


@pytest.mark.parametrize("factor, spikes", [(1.5, [25]), (0, [])])
def test_a_loss_spike_is_an_event_and_changes_nothing(tmp_path, capsys, corpus_dir, tokenizer_dir,
                                                      toy_config_dir, factor, spikes):
    import train_clm
    from clm.config import parse_config
    from helpers import TYPES

    out = tmp_path / "run"
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=30, eval_steps=0,
                    num_samples=0, learning_rate=1e-2, min_lr=1e-3) + [
        "--loss_spike_factor", str(factor)]
    train_clm.main(*parse_config(TYPES, argv), batches=EasyThenHard(32, hard=25))
    records = metrics(out)
    events = [r for r in records if r.get("event") == "loss_spike"]
    assert [e["step"] for e in events] == spikes
    steps = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert len(steps) == 30, "every step trained and logged: the spike is only reported"
    if events:
        (e,) = events
        assert e["step_loss"] == steps[25] and e["step_loss"] > 1.5 * e["median_loss"]
        assert e["window"] == 24 and "loss" not in e and "eval_loss" not in e
        assert "step 25: loss spike" in capsys.readouterr().out


def test_loss_spike_factor_is_checked():
    with pytest.raises(ValueError, match=r"--loss_spike_factor must be > 1, or 0 for off"):
        TrainingConfig(output_dir="x", loss_spike_factor=0.5)
