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
    with pytest.raises(UsageError, match=r"unknown --optim 'sgd' \(choose adamw_torch, "
                       r"adamw_torch_fused, muon\)"):
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
                        optim.OPTIMIZERS["adamw_torch"]._replace(state_bytes=4,
                                                                 matrix_state_bytes=4))
    assert optimizer_bytes(ddp) == 4 * p
    fsdp = replace(ddp, backend="fsdp", shard=3, num_gpus=4)
    assert optimizer_bytes(fsdp) == 4 * p / 4
    # Muon: one fp32 momentum buffer on the block matrices, AdamW's two moments elsewhere
    matrices = sum(m.weight.numel() for b in gpt2().transformer.h
                   for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert shape.hidden_matrices == matrices
    muon = replace(ddp, optim="muon")
    assert optimizer_bytes(muon) == pytest.approx(4 * matrices + 8 * (p - matrices))
    assert optimizer_bytes(replace(muon, backend="fsdp", shard=3, num_gpus=4)) == \
        pytest.approx(optimizer_bytes(muon) / 4)



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


# ----------------------------------------------------------------------------- Muon

def muon_cfg(**kw):
    return TrainingConfig(output_dir="x", optim="muon", learning_rate=1e-2, weight_decay=0.1,
                          **kw)


def no_dropout_gpt2(**kw):
    return gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = no_dropout_gpt2(tie_word_embeddings=False)
    opt = optim.make_optimizer(model, muon_cfg(muon_lr_ratio=2.0), fused=True)
    assert isinstance(opt, optim.MuonWithAdamW)
    muon = [g for g in opt.param_groups if g["muon"]]
    adamw = [g for g in opt.param_groups if not g["muon"]]
    assert names(model, [p for g in muon for p in g["params"]]) == \
        names(model, optim.roles(model)["hidden_matrices"])
    assert [g["role"] for g in adamw] == ["embeddings", "head", "norms_and_biases"]
    assert all(g["transposed"] and g["pieces"] == 1 for g in muon), "GPT-2's Conv1D"
    assert [g["weight_decay"] for g in muon] == [0.1] and adamw[-1]["weight_decay"] == 0.0
    optim.apply_schedule(opt, 10 ** 6, muon_cfg(muon_lr_ratio=2.0, max_steps=10))
    assert muon[0]["lr"] == pytest.approx(2 * adamw[0]["lr"]), "Muon's rate: ratio x AdamW's"

    x = torch.randint(0, 64, (2, 16))
    model(x, labels=x).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert not torch.equal(p, before[name]), f"{name} was not updated"
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert set(state) == {"momentum_buffer"}, name
        else:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, name


@pytest.mark.parametrize("adjust, nesterov", [("match_rms_adamw", True), ("original", True),
                                              ("match_rms_adamw", False)])
def test_a_conv1d_weight_gets_torch_muons_update_of_the_same_linear_weight(monkeypatch, adjust,
                                                                           nesterov):
    """HF's Conv1D stores (in, out), nn.Linear (out, in): our update of a Conv1D weight is the
    transpose of torch.optim.Muon's update of the equivalent Linear weight, bit for bit, over
    several steps of momentum. With "original" (rate scaled by sqrt(max(1, out/in))) a Muon
    that took the stored layout as it is would scale a 32 -> 96 layer's step by 1, not
    sqrt(3): the check below shows that it would differ."""
    from transformers.pytorch_utils import Conv1D

    monkeypatch.setattr(optim.MuonWithAdamW, "ADJUST_LR", adjust)
    torch.manual_seed(0)
    conv = Conv1D(96, 32)  # 32 in, 96 out; weight (32, 96)
    linear = torch.nn.Linear(32, 96, bias=False)
    naive = conv.weight.detach().clone().requires_grad_()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
    ours = optim.MuonWithAdamW([{"params": [conv.weight], "muon": True, "transposed": True,
                                 "pieces": 1, "momentum": 0.95, "nesterov": nesterov,
                                 "ns_steps": 5, "weight_decay": 0.1}], lr=0.02)
    reference = torch.optim.Muon([linear.weight], lr=0.02, weight_decay=0.1,
                                 adjust_lr_fn=adjust, nesterov=nesterov)
    as_stored = torch.optim.Muon([naive], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust,
                                 nesterov=nesterov)
    for _ in range(3):
        grad = torch.randn(96, 32)
        linear.weight.grad, conv.weight.grad, naive.grad = grad, grad.T.clone(), grad.T.clone()
        ours.step(), reference.step(), as_stored.step()
        assert torch.equal(conv.weight.T, linear.weight)
    assert torch.equal(naive, conv.weight) == (adjust == "match_rms_adamw")


def test_split_qkv_orthogonalises_query_key_and_value_apart():
    """--muon_split_qkv: c_attn's update is torch.optim.Muon's of the three (out, in)
    matrices it stacks, each apart."""
    model = no_dropout_gpt2()
    opt = optim.make_optimizer(model, muon_cfg(muon_split_qkv=True))
    split = [g for g in opt.param_groups if g["muon"] and g["pieces"] == 3]
    assert names(model, split[0]["params"]) == [f"transformer.h.{i}.attn.c_attn.weight"
                                                for i in range(2)]
    weight = model.transformer.h[0].attn.c_attn.weight       # (32 in, 96 out)
    parts = [w.T.detach().clone().requires_grad_() for w in weight.detach().split(32, dim=1)]
    reference = torch.optim.Muon(parts, lr=1e-2, weight_decay=0.1,
                                 adjust_lr_fn="match_rms_adamw")
    x = torch.randint(0, 64, (2, 16))
    model(x, labels=x).loss.backward()
    for part, g in zip(parts, weight.grad.split(32, dim=1)):
        part.grad = g.T.clone()
    optim.apply_schedule(opt, 10 ** 6, muon_cfg(muon_split_qkv=True, min_lr=1e-2,
                                                max_steps=10))
    opt.step(), reference.step()
    assert torch.equal(weight.detach(), torch.cat([p.detach().T for p in parts], dim=1))


def test_a_zero_partition_gets_the_step_of_its_whole_matrices(monkeypatch):
    """FlatLayout (ZeRO-1/2's flat partitions) on 4 simulated ranks: matrices with gaps between
    them, one spanning three partitions, a rank holding no matrix start and a padded tail.
    Each rank's slice of the step equals the step computed on the whole matrices."""
    shapes = [torch.Size(s) for s in ((6, 5), (3, 4), (20, 3), (2, 2))]
    offsets, at = [], 0
    for s in shapes:
        offsets.append(at)
        at += s.numel() + 2  # DeepSpeed's alignment gaps
    size = -(-at // 4)
    full = torch.randn(4 * size, generator=torch.Generator().manual_seed(0))
    step = lambda u, out: out.add_(u @ u.T @ u)  # noqa: E731  a stand-in: any whole-matrix map
    expected = torch.zeros_like(full)
    for o, s in zip(offsets, shapes):
        step(full[o:o + s.numel()].view(s), expected[o:o + s.numel()].view(s))
    pieces = list(full.chunk(4))
    monkeypatch.setattr(torch.distributed, "broadcast",
                        lambda t, src, group: t.copy_(pieces[src]))
    monkeypatch.setattr(torch.distributed, "get_global_rank", lambda group, r: r)
    got = [optim.FlatLayout(tuple(offsets), tuple(shapes), size, r, 4, None).step(
        pieces[r].clone(), step) for r in range(4)]
    end = offsets[2] + shapes[2].numel()
    assert (offsets[2] // size, (end - 1) // size) == (1, 3), "spans ranks 1-3"
    assert not [o for o in offsets if 2 * size <= o < 3 * size], "rank 2 starts no matrix"
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=0)


def test_muon_state_round_trips_and_momentum_warms_up():
    import copy

    cfg = muon_cfg(muon_momentum_warmup_steps=10, muon_momentum=0.95)
    assert [optim.muon_momentum_at(s, cfg) for s in (0, 5, 10, 50)] == \
        pytest.approx([0.85, 0.9, 0.95, 0.95])
    model = no_dropout_gpt2()
    opt = optim.make_optimizer(model, cfg, fused=True)
    x = torch.randint(0, 64, (2, 16))

    def step(m, o, s):
        optim.apply_schedule(o, s, cfg)
        loss = m(x, labels=x).loss
        loss.backward()
        o.step()
        o.zero_grad()
        return loss.item()

    for s in range(3):
        step(model, opt, s)
    assert [g["momentum"] for g in opt.param_groups if g["muon"]] == pytest.approx([0.87])
    twin = copy.deepcopy(model)
    resumed = optim.make_optimizer(twin, cfg, fused=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [step(model, opt, s) for s in range(3, 6)] == [step(twin, resumed, s)
                                                           for s in range(3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_muon_learning_rate_or_its_ratio():
    """--muon_learning_rate is the ratio by another name, set from the options each step (a
    checkpoint's saved lr_scale does not win over a changed --learning_rate)."""
    model = no_dropout_gpt2()
    cfg = muon_cfg(muon_learning_rate=3e-2, warmup_steps=0,
                   lr_scheduler_type="constant_with_warmup")
    opt = optim.make_optimizer(model, cfg)
    for group in opt.param_groups:
        if group["muon"]:
            group["lr_scale"] = 7.0  # as a checkpoint of another run might have saved it
    assert optim.apply_schedule(opt, 5, cfg) == pytest.approx(1e-2)
    assert {g["role"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"embeddings": 1e-2, "hidden_matrices": 3e-2, "norms_and_biases": 1e-2})
    with pytest.raises(UsageError, match="--muon_learning_rate and --muon_lr_ratio both given"):
        muon_cfg(muon_learning_rate=3e-2, muon_lr_ratio=2.0)


def test_muon_options_are_checked():
    for kw, message in [({"muon_lr_ratio": 0}, "--muon_lr_ratio must be > 0"),
                        ({"muon_momentum": 1.0}, "--muon_momentum must be in [0, 1)"),
                        ({"muon_ns_steps": 0}, "--muon_ns_steps must be in 1-99")]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
            TrainingConfig(output_dir="x", optim="muon", **kw)


def test_a_muon_run_resumes_exactly_and_another_optimizer_is_refused(
        tmp_path, capsys, corpus_dir, tokenizer_dir, toy_config_dir):
    """Through train_clm.py: a Muon run continued from its step-3 checkpoint trains as the run
    that was not stopped (Muon's momentum and AdamW's moments both restored); resuming it with
    AdamW is a one-line error naming the way to ask for it, and that way (its weights as
    --model_name_or_path, a new optimizer) runs."""
    import shutil

    from clm import checkpoint as ckpt
    from helpers import assert_same_training, metrics, run, toy_args

    def args(out, **kw):
        base = dict(max_steps=6, eval_steps=3, save_steps=3, num_samples=0)
        return toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **{**base, **kw}) + \
            ["--optim", "muon", "--muon_lr_ratio", "2", "--muon_momentum_warmup_steps", "4"]

    full = tmp_path / "full"
    run(args(full))
    records = [r for r in metrics(full) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(ckpt.checkpoint_root(resumed) / "step-6")
    run(args(resumed) + ["--resume_from_checkpoint", "latest"])
    assert "resumed from" in capsys.readouterr().out
    assert_same_training(resumed, full, max_steps=6, warmup_steps=2, learning_rate=6e-3,
                         min_lr=6e-4)

    step3 = ckpt.checkpoint_root(full) / "step-3"
    argv = [a if a != "muon" else "adamw_torch" for a in args(full, max_steps=9)]
    with pytest.raises(SystemExit) as e:
        run(argv + ["--resume_from_checkpoint", str(step3)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "training.optim=muon but this run has training.optim=adamw_torch (use the same " \
           f"--optim, or continue its weights with a new optimizer: --model_name_or_path " \
           f"{step3} in another --output_dir)" in err[0]
    argv = [a for a in args(tmp_path / "adamw") if a != "muon"]
    i = argv.index("--config_name")
    argv[i:i + 2] = ["--model_name_or_path", str(step3)]
    argv.remove("--optim")  # its value went with the filter: AdamW, the default
    run(argv)
    assert (tmp_path / "adamw" / "model.safetensors").is_file()


def test_untied_zero_initialised_head_trains_and_exports(tmp_path, corpus_dir, tokenizer_dir,
                                                         toy_config_dir):
    """--untie_word_embeddings --zero_init_head: the first loss is log(vocab) (every logit
    0), the head is its own tensor in the folder, and pipeline() generates from it."""
    import math

    from safetensors.torch import load_file
    from transformers import AutoConfig, pipeline

    from helpers import metrics, run, toy_args

    out = tmp_path / "untied"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=4, eval_steps=0,
                 num_samples=0) + ["--untie_word_embeddings", "--zero_init_head",
                                   "--optim", "muon"])
    config = AutoConfig.from_pretrained(out)
    assert config.tie_word_embeddings is False
    first = [r for r in metrics(out) if "loss" in r][0]["loss"]
    assert first == pytest.approx(math.log(config.vocab_size), rel=1e-5)
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" in weights and weights["lm_head.weight"].abs().sum() > 0
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    text = pipeline("text-generation", model=str(out))("The", max_new_tokens=4,
                                                       do_sample=False)[0]["generated_text"]
    assert text.startswith("The")
    with pytest.raises(UsageError, match="--zero_init_head needs --untie_word_embeddings"):
        from clm.config import ModelConfig

        ModelConfig(zero_init_head=True)


def test_an_fp16_overflow_skips_muons_half_too():
    """Under fp16 the GradScaler skips a step whose gradients overflowed: the fused AdamW half
    could do that alone, Muon's could not, so the scaler handles the whole optimizer."""
    model = no_dropout_gpt2()
    opt = optim.make_optimizer(model, muon_cfg(), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 64, (2, 16))
    scaler.scale(model(x, labels=x).loss).backward()
    model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 7
    opt.zero_grad()
    scaler.scale(model(x, labels=x).loss).backward()
    scaler.step(opt)
    assert not torch.equal(before[4], model.transformer.h[0].attn.c_attn.weight)
