"""--dry_run: the plan's figures (parameters, FLOPs, memory by backend, fits, suggestions) and a
CLI that reads no data and writes nothing."""

import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clm import loop, model as models, plan
from clm.config import DataConfig, ModelConfig, TrainingConfig, UsageError, parse_config
from helpers import ROOT, TYPES, run

GIB = 2**30


def configs(tmp_path, *argv):
    return parse_config(TYPES, ["--output_dir", str(tmp_path / "out"), "--dry_run",
                                "--dry_run_gpu_memory_gb", "80", *map(str, argv)])


def make_plan(tmp_path, *argv):
    return plan.make_plan(*configs(tmp_path, *argv))


def exact(tmp_path, *argv):
    """The plan's shape, set-up and memory in bytes (the JSON line rounds to MiB)."""
    data_cfg, model_cfg, train_cfg = configs(tmp_path, *argv)
    shape = plan.model_shape(data_cfg, model_cfg)
    setup = plan.setup_of(train_cfg, data_cfg.block_size, train_cfg.dry_run_num_gpus or 1,
                          False)
    return shape, setup, plan.memory_bytes(shape, setup)


def test_gpt2_preset_figures_match_a_real_model_on_meta(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    p = make_plan(tmp_path, "--model_preset", "gpt2", "--block_size", 1024,
                  "--per_device_train_batch_size", 16, "--gradient_accumulation_steps", 4,
                  "--dry_run_num_gpus", 8, "--max_steps", 1000)
    with torch.device("meta"):
        ref = GPT2LMHeadModel(GPT2Config(vocab_size=50304))
    assert p["vocab_size"] == 50304 == models.padded_vocab(50257)
    assert p["params"] == sum(t.numel() for t in ref.parameters()) == 124_475_904
    assert p["non_embedding_params"] == models.num_params(ref, non_embedding=True)
    assert p["flops_per_token"] == models.flops_per_token(ref, 1024)
    assert p["tokens_per_step"] == 16 * 4 * 8 * 1024 == 524_288
    hours = 1000 * 524_288 * p["flops_per_token"] / (8 * 989e12 * 0.4) / 3600
    assert p["hours_to_max_steps"] == pytest.approx(hours, abs=1e-3)
    m = p["memory_gib"]
    parts = m["weights"] + m["gradients"] + m["optimizer"] + m["activations"]
    assert m["total"] == pytest.approx(parts, abs=0.01) and p["fits"]
    # fp32 AdamW: 8 bytes of optimizer state per parameter
    assert m["optimizer"] == pytest.approx(8 * p["params"] / GIB, abs=1e-3)


def test_vocab_from_a_local_tokenizer_folder(tmp_path, tokenizer_dir, tokenizer):
    n, note = plan.tokenizer_vocab(str(tokenizer_dir))
    assert n == len(tokenizer) == 400 and "tokenizer.json" in note
    p = make_plan(tmp_path, "--model_preset", "tiny", "--tokenizer_name", tokenizer_dir,
                  "--block_size", 128)
    assert p["vocab_size"] == 448


def tiny_gpt2(n_layer=3, n_embd=64, vocab=448, device=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_head=4, n_embd=n_embd, n_positions=64,
                        vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return GPT2LMHeadModel(config)


def test_zero_stages_shard_by_the_number_of_gpus():
    shape = plan.shape_of(tiny_gpt2(device="meta"), "tiny", 64)
    base = plan.Setup("ddp", 0, False, False, "no", micro_batch=4, accumulation=1,
                      checkpointing=False, num_gpus=8, block_size=64, eager_attention=False)
    ddp = plan.memory_bytes(shape, base)
    z = {stage: plan.memory_bytes(shape, plan.replace(base, backend="deepspeed", shard=stage))
         for stage in (1, 2, 3)}
    p, largest = shape.params, shape.largest_layer
    # ZeRO-3 used to be planned as the largest module gathered, weights and gradients
    # (2 x largest_layer). DeepSpeed 0.19.8 keeps more: a parameter used again within
    # stage3_max_reuse_distance (1e9 by default) stays gathered from its forward to its
    # backward, so at the start of the backward a model this small is gathered whole
    # (test_zero3_replay_and_grad_accum_buffers_match_deepspeed measures it on a real engine),
    # and one module's gradient exists unreduced at a time.
    gathered, _ = plan.zero3_gathered(shape, plan.replace(base, backend="deepspeed", shard=3))
    assert gathered == p
    assert ddp["weights"] == 4 * p and ddp["optimizer"] == 8 * p
    assert ddp["gradients"] == 2 * 4 * p, "DDP's buckets are a second copy of the gradients"
    assert z[1]["optimizer"] == ddp["optimizer"] / 8 and z[1]["weights"] == 4 * p
    assert z[2]["gradients"] == 4 * p / 8 and z[2]["weights"] == 4 * p
    assert z[3]["weights"] == 4 * p / 8 + 4 * gathered == z[3]["gathered"] + 4 * p / 8
    assert z[3]["optimizer"] == ddp["optimizer"] / 8
    assert z[3]["gradients"] == 4 * p / 8 + 4 * largest  # and the largest module's, unreduced
    assert all(z[s]["activations"] == ddp["activations"] for s in z)
    # bf16 under DeepSpeed: 16-bit weights and gradients, fp32 master weights in the optimizer
    half = plan.memory_bytes(shape, plan.replace(base, backend="deepspeed", shard=3,
                                                 precision="bf16"))
    assert half["optimizer"] == 12 * p / 8 and half["weights"] == 2 * p / 8 + 2 * gathered
    off = plan.memory_bytes(shape, plan.replace(base, backend="deepspeed", shard=3,
                                                precision="bf16", offload_optimizer=True,
                                                offload_params=True))
    assert off["optimizer"] == 0 and off["weights"] == 2 * gathered
    assert off["host"] == 2 * p / 8 + 12 * p / 8 + (2 + 4) * p / 8


def test_ddp_and_zero3_plans_from_the_cli_options(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ("--model_preset", "gpt2-medium", "--mixed_precision", "bf16",
            "--dry_run_num_gpus", 8, "--per_device_train_batch_size", 4)
    ddp = make_plan(tmp_path, *args)
    z3 = make_plan(tmp_path, *args, "--deepspeed", "ds_configs/zero3.json")
    assert ddp["backend"].startswith("DDP") and z3["backend"].startswith("DeepSpeed ZeRO-3")
    # the model states, less the parameters ZeRO-3 keeps gathered: with zero3.json's
    # stage3_max_reuse_distance of 1e9 that is all of gpt2-medium's 355M in bf16 at the start
    # of the backward (zero3_gathered), which is not sharded and which DeepSpeed's estimator
    # does not count (it counts one gathered layer); what is sharded is below 1/6 of DDP's
    states = lambda p: sum(p["memory_gib"][k]  # noqa: E731
                           for k in ("weights", "gradients", "optimizer")) - \
        p["memory_gib"]["gathered"]
    assert states(z3) < states(ddp) / 6
    assert z3["memory_gib"]["activations"] == ddp["memory_gib"]["activations"]
    assert z3["tokens_per_step"] == ddp["tokens_per_step"]
    if z3["deepspeed_estimate_gib"] is not None:  # DeepSpeed's own figure, where installed
        assert z3["deepspeed_estimate_gib"] == pytest.approx(states(z3), rel=0.25)


def test_gradient_checkpointing_lowers_activations_only(tmp_path):
    args = ("--model_preset", "gpt2", "--per_device_train_batch_size", 8)
    plain = make_plan(tmp_path, *args)
    ckpt = make_plan(tmp_path, *args, "--gradient_checkpointing")
    layers = lambda p: p["memory_gib"]["activations"] - p["memory_gib"]["logits"]  # noqa: E731
    assert layers(ckpt) < layers(plain) / 4
    assert ckpt["memory_gib"]["total"] < plain["memory_gib"]["total"]
    for key in ("weights", "gradients", "optimizer", "logits"):
        assert ckpt["memory_gib"][key] == plain["memory_gib"][key]
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"]


def test_a_plan_that_does_not_fit_suggests_one_that_does(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the suggestions name ds_configs/ relative to the repository
    argv = ["--model_preset", "gpt2-xl", "--per_device_train_batch_size", 32,
            "--mixed_precision", "bf16", "--dry_run_num_gpus", 8]
    data_cfg, model_cfg, train_cfg = parse_config(TYPES, [
        "--output_dir", str(tmp_path / "out"), "--dry_run", "--dry_run_gpu_memory_gb", "24",
        *map(str, argv)])
    p = plan.make_plan(data_cfg, model_cfg, train_cfg)
    assert not p["fits"] and p["backend"].startswith("DDP")
    assert p["memory_gib"]["total"] > 24
    fitting = [s for s in p["suggestions"] if s["fits"]]
    assert fitting and all(s["memory_gib"] <= 0.9 * 24 for s in fitting)
    changes = " ".join(s["change"] for s in p["suggestions"])
    for change in ("ZeRO-3", "gradient checkpointing", "micro-batch 16"):
        assert change in changes
    # what is suggested really fits, at the same tokens per step, when planned again
    again = plan.make_plan(*parse_config(TYPES, [
        "--output_dir", str(tmp_path / "out"), "--dry_run", "--dry_run_gpu_memory_gb", "24",
        *map(str, argv), *fitting[-1]["args"].split()]))
    assert again["fits"] and again["tokens_per_step"] == p["tokens_per_step"]
    assert again["memory_gib"]["total"] == pytest.approx(fitting[-1]["memory_gib"])


def test_dry_run_in_process_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    result = run(["--output_dir", str(out), "--dry_run", "--model_preset", "tiny",
                  "--block_size", "128", "--train_files", str(tmp_path / "missing" / "*.txt"),
                  "--dry_run_gpu", "NVIDIA A100-SXM4-40GB", "--dry_run_gpu_memory_gb", "40"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert result["gpu"] == "NVIDIA A100-SXM4-40GB" and result["gpu_memory_gib"] == 40
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dry_run_cli_exit_0_json_last_reads_no_data(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_clm.py"), "--dry_run", "--output_dir", str(out),
         "--train_files", str(tmp_path / "no_such_data" / "*.jsonl"),
         "--tokenizer_name", str(tokenizer_dir), "--model_preset", "tiny", "--block_size", "256",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
         "--dry_run_num_gpus", "2", "--dry_run_mfu", "0.5", "--max_steps", "100"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["tokens_per_step"] == 4 * 2 * 2 * 256 and last["vocab_size"] == 448
    assert set(last["memory_gib"]) >= {"weights", "gradients", "optimizer", "activations",
                                       "total"}
    assert {"params", "flops_per_token", "fits", "gpu_memory_gib", "suggestions",
            "hours_to_max_steps"} <= set(last)
    assert "tokens per step" in proc.stdout and "memory per GPU" in proc.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, message", [
    ("dry_run_mfu", 0.0, "--dry_run_mfu 0.0 is out of range"),
    ("dry_run_mfu", 1.5, "--dry_run_mfu 1.5 is out of range"),
    ("dry_run_gpu_memory_gb", -1.0, "--dry_run_gpu_memory_gb must be > 0"),
    ("dry_run_num_gpus", 0, "--dry_run_num_gpus must be >= 1"),
    ("dry_run_gpu", "H100", "unknown --dry_run_gpu 'H100' (choose one of: NVIDIA B200;"),
])
def test_dry_run_options_are_checked(tmp_path, option, value, message):
    with pytest.raises(UsageError) as e:
        TrainingConfig(output_dir=str(tmp_path), **{option: value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_block_size_above_positions_is_the_usual_error(tmp_path):
    with pytest.raises(UsageError, match="--block_size 512 is above the model's 256 positions"):
        plan.make_plan(DataConfig(block_size=512), ModelConfig(model_preset="tiny"),
                       TrainingConfig(output_dir=str(tmp_path), dry_run=True))


def test_activation_formula_matches_what_autograd_saves():
    """On CPU in fp32 the tensors autograd keeps for the backward can be counted exactly: the
    Korthikanti et al. estimate of a GPT-2 forward (SDPA, no recomputation) is within 20%."""
    from transformers import GPT2Config, GPT2LMHeadModel

    b, t, h, layers, heads = 4, 256, 256, 4, 4
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=heads, n_embd=h, n_positions=t,
                                       vocab_size=512, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, activation_function=models.FAST_GELU))
    model.set_attn_implementation("sdpa")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 512, (b, t)))
    shape = plan.Shape("toy", 0, 0, 0, n_layer=layers, n_head=heads, hidden=h, vocab=512,
                       positions=t, flops_per_token=0.0, vocab_note="")
    setup = plan.Setup("ddp", 0, False, False, "no", micro_batch=b, accumulation=1,
                       checkpointing=False, num_gpus=1, block_size=t, eager_attention=False)
    estimate, _ = plan.activation_bytes(shape, setup)
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.2)


# --- the terms of issue 20: the loss's logits, fp32 masters, FSDP's unsharded accumulation,
# ZeRO-3's gathered parameters and DeepSpeed's fp32 gradient accumulation

class PeakBytes(TorchDispatchMode):
    """The most bytes of storage that ops create while it is on, alive at once (checked after
    every op), and what is still alive at the end: what a CPU step allocates, counted exactly.
    A storage's size is read when counted: FSDP frees its gathered parameters by resizing
    their storage to nothing."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata  # the storage itself (an address can be reused)
                if key not in self.live or self.live[key].expired():
                    self.live[key] = StorageWeakRef(storage)
        self.live = {k: ref for k, ref in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, self.alive())
        return out

    def alive(self) -> int:
        return sum(torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
                   for ref in self.live.values() if not ref.expired())


def logits_gib(p):
    return sum(t["gib"] for t in p["memory_terms"] if t["kind"] == "logits")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_logits_terms_of_gpt2_16x1024_by_precision(tmp_path, precision):
    """Finding 3: 16 x 1024 tokens x 50304 logits. Under bf16/fp16 they reach the loss in 16
    bits (and so does their gradient), one fp32 chunk at a time upcast; in fp32 cross-entropy
    keeps three fp32 copies. Accelerate's fp32 outputs (~3.1 GiB each) are gone."""
    argv = ["--model_preset", "gpt2", "--block_size", 1024, "--per_device_train_batch_size",
            16, "--mixed_precision", precision, "--dry_run_num_gpus", 8]
    p = make_plan(tmp_path, *argv)
    values = 16 * 1024 * 50304
    rows = loop.LOSS_CHUNK_ELEMENTS // 50304
    terms = [t for t in p["memory_terms"] if t["kind"] == "logits"]
    if precision == "no":
        assert len(terms) == 1 and terms[0]["what"].startswith("fp32 logits")
        assert terms[0]["gib"] == pytest.approx(3 * 4 * values / GIB, abs=1e-3)
    else:
        assert rows == 1334 and [t["what"].split(", ")[0] for t in terms] == [
            f"{precision} logits and their gradient", "one fp32 loss chunk of 1,334 rows "
            "recomputed in the backward"]
        assert terms[0]["gib"] == pytest.approx(2 * 2 * values / GIB, abs=1e-3)  # 3.07 GiB
        assert terms[1]["gib"] == pytest.approx(10 * rows * 50304 / GIB, abs=1e-3)
    assert p["memory_gib"]["logits"] == pytest.approx(logits_gib(p), abs=2e-3)
    lines = plan.format_plan(p)
    for t in terms:  # one line each in the --dry_run output
        assert any(t["what"] in line and f"{t['gib']:.2f}" in line for line in lines)


@pytest.mark.parametrize("dtype, tokens, chunk_rows", [
    (torch.bfloat16, 1024, 64), (torch.bfloat16, 2048, 128), (torch.float16, 1024, 100),
    (torch.bfloat16, 256, 512),  # one chunk: upcast whole
    (torch.float32, 1024, 64),
])
def test_logits_terms_are_what_the_loss_allocates(monkeypatch, dtype, tokens, chunk_rows):
    """The loss's own bytes at its peak (logits from a stand-in head, loop.nll_sum forward and
    backward), counted on CPU op by op, against the plan's terms for that shape: within 1%."""
    vocab, hidden = 1000, 8
    monkeypatch.setattr(loop, "LOSS_CHUNK_ELEMENTS", chunk_rows * vocab)
    hidden_states = torch.randn(tokens, hidden, dtype=dtype)
    head = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    with PeakBytes() as mem:
        loop.nll_sum(hidden_states @ head.t(), labels).backward()
    measured = mem.peak - head.grad.nbytes  # the head's gradient is not the loss's
    shape = plan.Shape("x", 0, 0, 0, n_layer=1, n_head=1, hidden=hidden, vocab=vocab,
                       positions=tokens, flops_per_token=0.0, vocab_note="")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[dtype]
    setup = plan.Setup("ddp", 0, False, False, precision, micro_batch=1, accumulation=1,
                       checkpointing=False, num_gpus=1, block_size=tokens, eager_attention=False)
    planned = sum(b for _, b in plan.logits_terms(shape, setup))
    assert measured == pytest.approx(planned, rel=0.01)
    assert planned == plan.activation_bytes(shape, setup)[1]


def test_logits_reach_the_loss_in_bf16_under_autocast():
    """What the 2-byte logits term rests on: through the DDP backend's prepare (Accelerate's
    autocast, without its fp32 conversion of the outputs) the loss gets bf16 logits."""
    from accelerate import Accelerator

    from clm.parallel import Topology
    from clm.parallel.ddp import DDPBackend

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, _ = DDPBackend(accelerator, Topology()).prepare(
        tiny_gpt2(n_layer=1, n_embd=32, vocab=64),
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
    seen = []
    nll_sum = loop.nll_sum

    def spy(logits, labels, *args):
        seen.append(logits.dtype)
        return nll_sum(logits, labels, *args)

    x = torch.randint(0, 64, (2, 16))
    batch, _, _ = loop.prepare_batch({"input_ids": x, "attention_mask": torch.ones_like(x),
                                      "labels": x}, accelerator.device)
    loop.nll_sum = spy
    try:
        loop.token_nll(model, batch)
    finally:
        loop.nll_sum = nll_sum
    assert seen == [torch.bfloat16]


def test_a_bf16_checkpoint_plans_fp32_masters_from_its_config_only(tmp_path):
    """Finding 5: the run loads any checkpoint in fp32 (masters) and computes in bf16 through
    autocast, so the plan counts 16 bytes a parameter for DDP (fp32 weights, gradients, two
    AdamW moments) whatever the checkpoint's dtype, and reads only its config: a weights file
    that is not one does not matter."""
    folder = tmp_path / "bf16_ckpt"
    tiny_gpt2(n_layer=2, n_embd=64, vocab=448).to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    (folder / "model.safetensors").write_bytes(b"not a weights file")
    common = ("--model_name_or_path", folder, "--block_size", 64)
    shape, _, mem = exact(tmp_path, *common, "--mixed_precision", "no")
    n = shape.params
    assert shape.checkpoint_dtype == "bfloat16"
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert "the checkpoint's bfloat16 loaded as fp32" in mem["terms"][0]["what"]
    # bf16 autocast: the fp32 masters and a bf16 copy of each weight for the compute
    assert exact(tmp_path, *common, "--mixed_precision", "bf16")[2]["weights"] == (4 + 2) * n
    p = make_plan(tmp_path, *common)  # the note reaches the --dry_run output
    assert p["checkpoint_dtype"] == "bfloat16"
    assert any("loaded as fp32" in line for line in plan.format_plan(p))


def fsdp_plans(tmp_path, accumulation):
    return make_plan(tmp_path, "--model_preset", "gpt2", "--block_size", 1024, "--fsdp",
                     "full_shard", "--mixed_precision", "bf16", "--dry_run_num_gpus", 8,
                     "--per_device_train_batch_size", 8, "--gradient_accumulation_steps",
                     accumulation)


def test_fsdp_accumulation_counts_the_whole_unsharded_gradient(tmp_path):
    """With accumulation FSDP2 keeps every gradient unsharded (fp32, the reduce dtype) between
    micro-batches: 4 bytes x all parameters on every GPU, not 1/8."""
    one, four = fsdp_plans(tmp_path, 1), fsdp_plans(tmp_path, 4)
    n = one["params"]
    for kind, per_param in (("optimizer", 8), ("gradients", 4)):  # the rest 1/8 shards
        sharded = [t["gib"] for t in one["memory_terms"]
                   if t["kind"] == kind and t["what"].endswith("1/8 shard")]
        assert sharded == [pytest.approx(per_param * n / 8 / GIB, abs=1e-3)]
    extra = four["memory_gib"]["gradients"] - one["memory_gib"]["gradients"]
    assert extra == pytest.approx(4 * one["params"] / GIB, abs=2e-3)
    assert four["memory_gib"]["total"] - one["memory_gib"]["total"] == pytest.approx(extra,
                                                                                     abs=2e-3)
    names = lambda p: [t["what"] for t in p["memory_terms"]]  # noqa: E731
    assert "FSDP's unsharded fp32 gradients, accumulated over the micro-batches" in names(four)
    assert not any("accumulated" in what for what in names(one))


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_fsdp_keeps_what_the_plan_counts_between_micro_batches(precision):
    """Measured: a micro-batch without gradient sync (FSDPBackend.micro_batch, not the last)
    leaves exactly the plan's term alive, 4 bytes a parameter, and no sharded gradient yet."""
    import torch.distributed as dist

    from clm.parallel import Topology
    from clm.parallel.fsdp import FSDPBackend

    if dist.is_initialized():
        pytest.fail("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_gpt2(n_layer=2, n_embd=32, vocab=64)
        shape = plan.shape_of(model, "tiny", 16)
        fsdp = FSDPBackend(SimpleNamespace(device=torch.device("cpu")), Topology(), precision)
        model, _ = fsdp.prepare(model, None, make_optimizer=lambda m: torch.optim.AdamW(
            m.parameters()))
        x = torch.randint(0, 64, (2, 16))
        with PeakBytes() as mem:
            with fsdp.micro_batch(model, last=False):
                fsdp.backward(model, model(input_ids=x).logits.float().sum())
            kept = mem.alive()
        assert all(p.grad is None for p in model.parameters()), "nothing reduce-scattered"
        setup = plan.Setup("fsdp", 3, False, False, precision, micro_batch=2, accumulation=2,
                           checkpointing=False, num_gpus=1, block_size=16,
                           eager_attention=False)
        term = [b for _, what, b, _ in plan.memory_terms(shape, setup)
                if what.startswith("FSDP's unsharded fp32 gradients")]
        assert term == [4 * shape.params] and kept == pytest.approx(term[0], rel=0.01)
    finally:
        dist.destroy_process_group()


def zero3_json(tmp_path, **knobs):
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(knobs)
    path = tmp_path / f"z3_{len(list(tmp_path.glob('z3_*')))}.json"
    path.write_text(json.dumps(config))
    return path


def test_zero3_gathered_parameters_follow_the_json(tmp_path):
    """ZeRO-3 keeps a parameter gathered while it is used again within
    stage3_max_reuse_distance parameters (zero3.json: 1e9, so all of GPT-2 small at the start
    of the backward); max_live_parameters only caps the prefetch; small parameters persist."""
    args = ("--model_preset", "gpt2", "--block_size", 1024, "--mixed_precision", "bf16",
            "--dry_run_num_gpus", 8, "--per_device_train_batch_size", 4, "--deepspeed")

    def gathered(json_file):
        shape, setup, mem = exact(tmp_path, *args, json_file)
        assert mem["gathered"] == 2 * plan.zero3_gathered(shape, setup)[0]  # bf16
        return mem["gathered"] / 2, shape

    everything, shape = gathered(ROOT / "ds_configs" / "zero3.json")
    assert everything == shape.params == 124_475_904
    # released after each use, no prefetch: the persistent parameters (biases and norms: at
    # most the JSON's threshold, filled by the run) and the largest module, the tied
    # embedding/head
    _, setup, _ = exact(tmp_path, *args, ROOT / "ds_configs" / "zero3.json")
    threshold = plan.zero3_knobs(shape, setup)["stage3_param_persistence_threshold"]
    small = sum(k for k in shape.numels if k <= threshold)
    assert 0 < small < 200_000 and shape.largest_layer == 50304 * 768
    tight, _ = gathered(zero3_json(tmp_path, stage3_max_reuse_distance=0,
                                   stage3_prefetch_bucket_size=0))
    assert tight == small + shape.largest_layer
    # prefetching up to max_live_parameters: more, bounded by it and the modules in use
    capped, _ = gathered(zero3_json(tmp_path, stage3_max_reuse_distance=0,
                                    stage3_prefetch_bucket_size=10**9,
                                    stage3_max_live_parameters=20_000_000))
    assert tight < capped <= small + 20_000_000 + 2 * shape.largest_layer
    p = make_plan(tmp_path, *args, zero3_json(tmp_path, stage3_max_live_parameters=20_000_000))
    line = [t["what"] for t in p["memory_terms"] if t["what"].startswith("ZeRO-3 gathered")]
    assert len(line) == 1 and "max_live 2e+07" in line[0]


ZERO_CHECK = r"""
import json, os, socket, sys
os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                  LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
import torch, deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import GPT2Config, GPT2LMHeadModel

deepspeed.init_distributed(dist_backend="gloo")
def engine(config):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64,
                                       vocab_size=448))
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, **config}
    return deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                config=config)[0]
out = {"gathered": []}
for zero in json.loads(sys.argv[1]):
    e = engine({"zero_optimization": {"stage": 3, "overlap_comm": False, **zero}})
    params, peak = list(e.module.parameters()), [0]
    def note(*_):
        peak[0] = max(peak[0], sum(p.ds_numel for p in params
                                   if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))
    for m in e.module.modules():
        for hook in (m.register_forward_pre_hook, m.register_forward_hook,
                     m.register_full_backward_pre_hook, m.register_full_backward_hook):
            hook(note)
    x = torch.randint(0, 448, (2, 32))
    for step in range(3):  # the trace is recorded in the first, used from the second
        peak[0] = 0
        e.backward(e(input_ids=x, labels=x).loss)
        e.step()
    out["gathered"].append(peak[0])
for stage in (1, 3):  # bf16 with fp32 gradient accumulation: the buffers the plan counts
    e = engine({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                "communication_data_type": "fp32", "zero_optimization": {"stage": stage}})
    o = e.optimizer
    bufs = o.fp32_groups_gradients_flat if stage == 1 else [o.grad_partitions_flat_buffer]
    out[f"zero{stage}"] = [type(o).__name__, sorted({str(b.dtype) for b in bufs}),
                           sum(b.numel() for b in bufs)]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_zero3_replay_and_grad_accum_buffers_match_deepspeed(tmp_path):
    """Against real DeepSpeed engines (CPU, one process): the most parameters gathered at once
    in a step equals the plan's replay of the coordinator for each set of knobs; bf16 with
    grad_accum_dtype fp32 keeps fp32 gradient buffers, full-size under ZeRO-1 (BF16_Optimizer;
    its buffer is zeros_like the whole flat bf16 model) and partitions under ZeRO-3."""
    knobs = [dict(stage3_max_reuse_distance=10**9, stage3_prefetch_bucket_size=0,
                  stage3_param_persistence_threshold=640),
             dict(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=10**9,
                  stage3_max_live_parameters=60_000, stage3_param_persistence_threshold=640),
             dict(stage3_max_reuse_distance=40_000, stage3_prefetch_bucket_size=0,
                  stage3_param_persistence_threshold=640)]
    proc = subprocess.run([sys.executable, "-c", ZERO_CHECK, json.dumps(knobs)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, proc.stderr[-3000:]
    real = json.loads(results[0][len("RESULT "):])
    shape = plan.shape_of(tiny_gpt2(device="meta"), "tiny", 32)
    setup = plan.Setup("deepspeed", 3, False, False, "no", micro_batch=2, accumulation=1,
                       checkpointing=False, num_gpus=1, block_size=32, eager_attention=False)
    replayed = [plan.zero3_gathered(shape, plan.replace(setup, zero3=tuple(k.items())))[0]
                for k in knobs]
    assert replayed == real["gathered"]
    assert replayed[0] == shape.params > replayed[1] > replayed[2] > shape.largest_layer
    assert real["zero1"] == ["BF16_Optimizer", ["torch.float32"], shape.params]
    assert real["zero3"] == ["DeepSpeedZeroOptimizer_Stage3", ["torch.float32"], shape.params]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_gradients_follow_grad_accum_dtype(tmp_path, stage):
    """bf16 engines: accumulating in bf16 the gradients are bf16 and the step casts its
    partition to fp32; with grad_accum_dtype fp32 (what the repository's JSONs get under bf16)
    ZeRO-1 holds a full-size fp32 buffer besides the bf16 gradients, ZeRO-2/3 an fp32
    partition and no second copy."""
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    files = {"repo": ROOT / "ds_configs" / f"zero{stage}.json"}
    for name in ("bf16", "fp32"):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({**config, "communication_data_type": name,
                                           "data_types": {"grad_accum_dtype": name}}))
    args = ("--model_preset", "gpt2", "--block_size", 1024, "--mixed_precision", "bf16",
            "--dry_run_num_gpus", 8, "--per_device_train_batch_size", 4)
    runs = {k: exact(tmp_path, *args, "--deepspeed", f) for k, f in files.items()}
    p = runs["bf16"][0].params
    grads = {k: mem["gradients"] for k, (_, _, mem) in runs.items()}
    unreduced = 2 * 50304 * 768 if stage == 3 else 0  # ZeRO-3: the largest module's, bf16
    assert grads["bf16"] == 2 * p / (8 if stage >= 2 else 1) + 4 * p / 8 + unreduced
    assert grads["fp32"] == (2 * p + 4 * p if stage == 1 else 4 * p / 8 + unreduced)
    assert "bf16 gradient accumulation" in runs["bf16"][1].describe()
    assert "fp32 gradient accumulation" in runs["fp32"][1].describe()
    assert runs["repo"][1].grad_accum_dtype == "fp32" and grads["repo"] == grads["fp32"]
