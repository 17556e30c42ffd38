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



def schedule(kind, kwargs=None, **kw):
    cfg = TrainingConfig(output_dir="x", learning_rate=1e-3, min_lr=1e-4, warmup_steps=10,
                         max_steps=110, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, **kw)
    return [optim.lr_at(s, cfg) for s in range(cfg.max_steps)]


def test_each_schedule_by_hand():
    warmup = [1e-3 * (s + 1) / 10 for s in range(10)]
    for kind in ("cosine_with_min_lr", "cosine", "linear", "constant_with_warmup",
                 "warmup_stable_decay"):
        assert schedule(kind)[:10] == pytest.approx(warmup), kind
    cos = schedule("cosine_with_min_lr")
    assert cos[10] == pytest.approx(1e-3) and cos[60] == pytest.approx(5.5e-4)
    default = TrainingConfig(output_dir="x", learning_rate=1e-3, min_lr=1e-4, warmup_steps=10,
                             max_steps=110)
    assert default.lr_scheduler_type == "cosine_with_min_lr", "the default: as before"
    assert cos[-1] > 1e-4 and optim.lr_at(110, default) == pytest.approx(1e-4)
    assert schedule("cosine")[60] == pytest.approx(5e-4), "HF's cosine goes to 0"
    assert schedule("linear")[60] == pytest.approx(5e-4) and schedule("linear")[109] < 2e-5
    assert set(schedule("constant_with_warmup")[10:]) == {1e-3}
    # warmup-stable-decay: the peak until the last 20% (22 steps), then linearly to min_lr
    wsd = schedule("warmup_stable_decay")
    assert set(wsd[10:88]) == {1e-3} and wsd[88] == pytest.approx(1e-3)
    assert wsd[99] == pytest.approx(1e-4 + 0.5 * 9e-4)
    sqrt = schedule("warmup_stable_decay", '{"num_decay_steps": 10, "decay_type": "1-sqrt"}')
    assert set(sqrt[10:100]) == {1e-3} and sqrt[104] == pytest.approx(
        1e-4 + (1 - 0.4 ** 0.5) * 9e-4)


def test_a_wsd_run_extended_before_its_decay_keeps_its_rates():
    """A checkpoint taken in the stable phase continues with a larger --max_steps: the rates up
    to it are the same, and the decay moves to the new end."""
    kw = '{"num_decay_steps": 20}'
    short = schedule("warmup_stable_decay", kw)            # decays over steps 90-109
    cfg = TrainingConfig(output_dir="x", learning_rate=1e-3, min_lr=1e-4, warmup_steps=10,
                         max_steps=200, lr_scheduler_type="warmup_stable_decay",
                         lr_scheduler_kwargs={"num_decay_steps": 20})  # a YAML mapping
    longer = [optim.lr_at(s, cfg) for s in range(200)]
    assert longer[:90] == short[:90] and set(longer[10:180]) == {1e-3}
    assert longer[199] == pytest.approx(1e-4 + 9e-4 / 20)


@pytest.mark.parametrize("kind, kwargs, message", [
    ("wsd", None, "unknown --lr_scheduler_type 'wsd' (choose cosine_with_min_lr, cosine"),
    ("cosine", '{"decay_ratio": 0.1}', "['decay_ratio'] are not settings of cosine (it takes "
     "none)"),
    ("warmup_stable_decay", "decay_ratio=0.1", "is not JSON"),
    ("warmup_stable_decay", '{"decay_type": "step"}', "decay_type 'step' is unknown"),
    ("warmup_stable_decay", '{"decay_ratio": 0.1, "num_decay_steps": 5}', "keep one"),
    ("warmup_stable_decay", '{"decay_ratio": 1.5}', "decay_ratio must be in (0, 1]"),
])
def test_bad_schedules_are_one_line_errors(kind, kwargs, message):
    with pytest.raises(UsageError) as e:
        TrainingConfig(output_dir="x", lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_run_logs_the_schedule_it_was_given(tmp_path, corpus_dir, tokenizer_dir,
                                                toy_config_dir):
    """Through train_clm.py's CLI: the logged rates are warmup-stable-decay's, and
    run_config.yaml records the schedule's settings as a mapping."""
    import yaml
    from helpers import metrics, run, toy_args

    out = tmp_path / "wsd"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=5, eval_steps=0,
                 num_samples=0) + ["--lr_scheduler_type", "warmup_stable_decay",
                                   "--lr_scheduler_kwargs", '{"num_decay_steps": 2}'])
    cfg = TrainingConfig(output_dir="x", max_steps=5, warmup_steps=2, learning_rate=3e-3,
                         min_lr=3e-4, lr_scheduler_type="warmup_stable_decay",
                         lr_scheduler_kwargs={"num_decay_steps": 2})
    logged = [r["lr"] for r in metrics(out) if "lr" in r]
    assert logged == [optim.lr_at(s, cfg) for s in range(5)] == \
        pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3, 1.65e-3])
    saved = yaml.safe_load((out / "run_config.yaml").read_text())["training"]
    assert saved["lr_scheduler_kwargs"] == {"num_decay_steps": 2}
