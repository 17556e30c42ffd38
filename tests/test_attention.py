"""Plain causal rows reach SDPA with no mask and is_causal=True, eager and compiled, so the
flash-only kernel choice on CUDA can always serve them; masked batches keep their masks."""

import pytest
import torch

from clm import attention, loop


def toy_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("sdpa")
    return model


def batches():
    """A packed pretraining batch (no padding), a padded one, and packed examples."""
    ids = torch.randint(1, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    padded = mask.clone()
    padded[1, -5:] = 0
    positions = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)
    cpu = torch.device("cpu")
    return {"plain": loop.prepare_batch({"input_ids": ids, "attention_mask": mask,
                                         "labels": ids}, cpu)[0],
            "padded": loop.prepare_batch({"input_ids": ids, "attention_mask": padded,
                                          "labels": ids}, cpu)[0],
            "packed": loop.prepare_batch({"input_ids": ids, "attention_mask": mask,
                                          "labels": ids, "position_ids": positions}, cpu)[0]}


def sdpa_calls_when_compiled(model, batch, whole: bool) -> list[tuple[bool, bool]]:
    """(mask passed, is_causal) of every SDPA call in the graphs torch.compile captures for
    `batch` from `model` compiled whole (mask creation traced too) or block by block (as
    --torch_compile does)."""
    import torch._dynamo as dynamo

    calls = []

    def inspect(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product" in str(node.target):
                calls.append((node.kwargs.get("attn_mask") is not None,
                              node.kwargs.get("is_causal")))
        return graph_module.forward

    dynamo.reset()
    for module in [model] if whole else model.transformer.h:
        module.compile(backend=inspect)
    try:
        loop.token_nll(model, batch)
    finally:
        dynamo.reset()
    return calls


@pytest.mark.parametrize("whole", [True, False], ids=["whole model", "per block"])
def test_compiled_plain_rows_pass_no_mask_and_the_cuda_choice_serves_them(whole):
    from torch.nn.attention import SDPBackend

    data = batches()
    plain = sdpa_calls_when_compiled(toy_model(), data["plain"], whole)
    # before clm/attention.py: GPT-2's own position ids made transformers' packed-sequence
    # check build a 4-D mask while tracing, passed with is_causal=False
    assert plain and all(call == (False, True) for call in plain), plain
    padded = sdpa_calls_when_compiled(toy_model(), data["padded"], whole)
    assert padded and all(masked and not causal for masked, causal in padded)
    # the CUDA kernels chosen for each kind of batch take what the model passes: flash (no
    # mask) alone for plain rows, a kernel that takes a mask too where masks are passed
    for kind, calls in (("plain", plain), ("padded", padded)):
        kernels = attention.sdpa_kernels("cuda", "bf16", "sdpa", masked=kind != "plain")
        assert SDPBackend.FLASH_ATTENTION in kernels
        if any(masked for masked, _ in calls):
            assert SDPBackend.EFFICIENT_ATTENTION in kernels
        else:
            assert kernels == [SDPBackend.FLASH_ATTENTION]
    assert attention.sdpa_kernels("cuda", "fp16", "sdpa", masked=False) == \
        [SDPBackend.FLASH_ATTENTION]
    for args in (("cpu", "bf16", "sdpa"), ("cuda", "no", "sdpa"), ("cuda", "bf16", "eager")):
        assert attention.sdpa_kernels(*args, masked=False) is None


def test_plain_rows_skip_the_packed_sequence_check(monkeypatch):
    """Eager, the check is a host sync per micro-batch (`.all()` on the position ids)."""
    import transformers.masking_utils as masking

    checks = []
    real = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices",
                        lambda ids: checks.append(ids) or real(ids))
    model, data = toy_model(), batches()
    loop.token_nll(model, data["plain"])
    assert checks == []
    loop.token_nll(model, data["packed"])  # packed examples still get their per-example mask
    assert len(checks) == 1


@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
def test_causal_rows_change_no_number(kind):
    """Same loss and gradients as transformers' masked sdpa and its eager attention."""
    data = batches()[kind]
    results = []
    for impl, plain in (("sdpa", True), ("sdpa", False), ("eager", False)):
        model = toy_model()
        model.set_attn_implementation(impl)
        with attention.causal_rows(model, plain and kind == "plain"):
            nll = model(input_ids=data["input_ids"],
                        attention_mask=data.get("attention_mask"),
                        position_ids=data.get("position_ids"), use_cache=False).logits
        nll = loop.nll_sum(nll.flatten(0, 1), data["labels"].flatten())
        nll.backward()
        results.append((nll.item(), model.transformer.h[0].attn.c_attn.weight.grad))
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-6)


def test_causal_rows_restores_sdpa_and_is_never_saved(tmp_path):
    model = toy_model()
    with pytest.raises(RuntimeError):
        with attention.causal_rows(model):
            assert model.config._attn_implementation == attention.CAUSAL_SDPA
            raise RuntimeError("a failed forward")
    assert model.config._attn_implementation == "sdpa"
    with attention.causal_rows(model):
        model.save_pretrained(tmp_path)
    assert attention.CAUSAL_SDPA not in (tmp_path / "config.json").read_text()
    # under wrappers (DDP, DeepSpeed, peft keep the model as .module / .config)
    wrapped = torch.nn.Module()
    wrapped.module = model
    assert attention.model_config(wrapped) is model.config
    engine = torch.nn.Module()  # a DeepSpeed engine's .config is its JSON
    engine.module, engine.config = model, {"train_batch_size": 8}
    assert attention.model_config(engine) is model.config
