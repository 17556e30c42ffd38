"""clm/optim.py: parameter groups by role, the schedule per group, the fused choice, the state
bytes the planner counts, and --optim's checks."""

from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clm import optim, plan
from clm.config import OPTIM_CHOICES, TrainingConfig, UsageError


def gpt2(**kw):
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16,
                                      vocab_size=64, **kw))


def names(model, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}  # a tied weight: its first name
    return [by_id[id(p)] for p in params]


def test_every_trainable_parameter_has_one_role():
    model = gpt2()
    roles = optim.roles(model)
    assert names(model, roles["embeddings"]) == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert roles["head"] == [], "GPT-2's head is the token embedding (tied)"
    assert names(model, roles["hidden_matrices"]) == [
        f"transformer.h.{i}.{m}.weight" for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    norms = names(model, roles["norms_and_biases"])
    assert "transformer.ln_f.weight" in norms and "transformer.h.0.attn.c_attn.bias" in norms
    assert all(n.endswith(".bias") or ".ln_" in n for n in norms)
    every = [p for params in roles.values() for p in params]
    assert sorted(map(id, every)) == sorted(id(p) for p in model.parameters())

    untied = gpt2(tie_word_embeddings=False)
    assert names(untied, optim.roles(untied)["head"]) == ["lm_head.weight"]
    frozen = gpt2()
    frozen.transformer.wpe.weight.requires_grad_(False)
    assert names(frozen, optim.roles(frozen)["embeddings"]) == ["transformer.wte.weight"]


def test_adamw_groups_decay_the_matrices_only_and_are_the_two_groups_it_had():
    model = gpt2(tie_word_embeddings=False)
    cfg = TrainingConfig(output_dir="x", weight_decay=0.1)
    opt = optim.make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["role"]: g for g in opt.param_groups}
    assert list(groups) == ["embeddings", "head", "hidden_matrices", "norms_and_biases"]
    assert {r: g["weight_decay"] for r, g in groups.items()} == {
        "embeddings": 0.1, "head": 0.1, "hidden_matrices": 0.1, "norms_and_biases": 0.0}
    # the same split as before the roles: decay exactly the parameters of two or more dims
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert opt.defaults["betas"] == (cfg.adam_beta1, cfg.adam_beta2)


def test_the_schedule_sets_each_group_times_its_scale():
    model = gpt2()
    cfg = TrainingConfig(output_dir="x", learning_rate=1e-3, min_lr=1e-4, warmup_steps=10,
                         max_steps=100)
    opt = optim.make_optimizer(model, cfg)
    opt.param_groups[0]["lr_scale"] = 0.5
    optim.set_lr(opt, optim.lr_at(4, cfg))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 5e-4)
    assert [g["lr"] for g in opt.param_groups[1:]] == pytest.approx([5e-4] * 2)
    assert optim.lr_at(10, cfg) == pytest.approx(1e-3) and optim.lr_at(100, cfg) == 1e-4


def test_fused_only_where_the_backend_allows_it():
    model = gpt2()
    cfg = TrainingConfig(output_dir="x")
    assert optim.make_optimizer(model, cfg, fused=True).defaults["fused"] is True
    assert not optim.make_optimizer(model, cfg, fused=False).defaults["fused"]


def test_optim_choices_are_checked_and_each_is_implemented():
    assert set(OPTIM_CHOICES) == set(optim.OPTIMIZERS)
    with pytest.raises(UsageError, match=r"unknown --optim 'sgd' \(choose adamw_torch\)"):
        TrainingConfig(output_dir="x", optim="sgd")


def test_the_planner_counts_the_optimizers_state_bytes(monkeypatch):
    """--dry_run's optimizer term is the optimizer's own state size: change it and the plan
    follows (DDP: all of it per GPU; FSDP: 1/N)."""
    shape = plan.shape_of(gpt2(), "tiny", 16)
    p = shape.params
    ddp = plan.Setup("ddp", 0, False, False, "no", micro_batch=1, accumulation=1,
                     checkpointing=False, num_gpus=1, block_size=16, eager_attention=False)

    def optimizer_bytes(setup):
        return sum(b for kind, _, b, _ in plan.memory_terms(shape, setup) if kind == "optimizer")

    assert optimizer_bytes(ddp) == 8 * p
    monkeypatch.setitem(optim.OPTIMIZERS, "adamw_torch",
                        optim.OPTIMIZERS["adamw_torch"]._replace(state_bytes=4))
    assert optimizer_bytes(ddp) == 4 * p
    fsdp = replace(ddp, backend="fsdp", shard=3, num_gpus=4)
    assert optimizer_bytes(fsdp) == 4 * p / 4

