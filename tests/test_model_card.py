"""The model card: huggingface_hub ModelCardData metadata (base model, datasets, eval results as a
model-index) that round-trips through ModelCard.load, and a body naming what the metadata cannot."""

import copy
import dataclasses
import math

import pytest
from helpers import metrics, run, toy_args
from huggingface_hub import ModelCard

from clm.hub import hub_name, model_card
from clm.record import RunRecord

HEADER = "---\nlibrary_name: transformers\npipeline_tag: text-generation\n"


def pretrain_run(**changes) -> dict:
    """What train_clm.py's run dict holds when the card is written (the keys it reads)."""
    r = {
        "data": {"dataset_name": "Skylion007/openwebtext", "dataset_config_name": None,
                 "dataset_revision": None, "train_files": None, "validation_files": None,
                 "block_size": 1024, "validation_split_percentage": 1.0},
        "model": {"model_preset": "gpt2", "config_name": None, "model_name_or_path": None},
        "training": {"output_dir": "outputs/owt", "license": "mit", "hub_model_id": "me/owt",
                     "run_name": None},
        "world_size": 8, "global_batch_sequences": 480, "tokens_per_step": 491520,
        "model_info": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024,
                       "vocab_size": 50257, "params": 124_439_808},
        "command": "accelerate launch train_clm.py --config configs/gpt2_owt.yaml",
        "name": "owt", "step": 600, "tokens": 294_912_000, "elapsed_s": 3723.4,
        "skipped_steps": 0, "final_eval_loss": 3.3012, "first_eval_loss": 10.98,
    }
    r.update(changes)
    return r


def sft_run(base: str, **changes) -> dict:
    """What finetune/run_sft.py's run dict holds: local records, a base model, task sft."""
    r = pretrain_run(name="sft-demo", task="sft", train_examples=800, heldout_examples=200,
                     skipped_examples=0, trainable_params=124_439_808, world_size=1,
                     global_batch_sequences=8, step=120, tokens=122_880, elapsed_s=61.0,
                     final_eval_loss=1.25,
                     command="python finetune/run_sft.py --train_files data/sft/train.jsonl")
    r["data"] = {"dataset_name": None, "dataset_config_name": None,
                 "train_files": ["data/sft/train.jsonl"], "validation_files": None,
                 "block_size": 256, "completion_only_loss": True}
    r["model"] = {"model_preset": "gpt2", "config_name": None, "model_name_or_path": base}
    r["training"] = {"output_dir": "outputs/sft", "license": None, "hub_model_id": None}
    r["lora"] = {"use_peft": False}
    r.update(changes)
    return r


def write_and_load(tmp_path, run_dict):
    content = model_card(RunRecord.from_dict(run_dict))
    path = tmp_path / "README.md"
    path.write_text(content)
    return content, ModelCard.load(path)


def results_by_metric(card):
    return {r.metric_type: r for r in card.data.eval_results}


def test_pretraining_card_from_hub_dataset(tmp_path):
    content, card = write_and_load(tmp_path, pretrain_run())
    assert content.startswith(HEADER)
    assert ModelCard(content).content == content, "renders and re-renders unchanged"
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "mit" and data.base_model is None
    assert data.datasets == ["Skylion007/openwebtext"]
    assert data.tags == ["gpt2", "causal-lm", "pretraining"]
    assert data.model_name == "owt"
    res = results_by_metric(card)
    assert set(res) == {"loss", "perplexity"}
    assert res["loss"].metric_value == pytest.approx(3.3012)
    assert res["perplexity"].metric_value == pytest.approx(math.exp(3.3012))
    for r in res.values():
        assert r.task_type == "text-generation"
        assert r.dataset_type == r.dataset_name == "Skylion007/openwebtext"
    body = card.text
    assert "# owt" in body and "trained from scratch" in body and "Base model" not in body
    for row in ("| data | Skylion007/openwebtext |", "| tokens seen | 294,912,000 |",
                "| optimizer steps | 600 |", "| global batch | 480 sequences x 1024 tokens |",
                "| final eval loss | 3.3012 |",
                f"| final eval perplexity | {math.exp(3.3012):.2f} |",
                "| world size | 8 |", "| wall time | 3723 s |"):
        assert row in body, row
    assert "![loss curve](loss_curve.png)" in body and 'model="me/owt"' in body
    assert "accelerate launch train_clm.py --config configs/gpt2_owt.yaml" in body


def test_hub_dataset_config_and_revision_go_into_the_eval_dataset(tmp_path):
    r = pretrain_run()
    r["data"].update(dataset_name="HuggingFaceFW/fineweb-edu", dataset_config_name="sample-10BT",
                     dataset_revision="v1.2.0")
    _, card = write_and_load(tmp_path, r)
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    loss = results_by_metric(card)["loss"]
    assert (loss.dataset_type, loss.dataset_config, loss.dataset_revision) == \
        ("HuggingFaceFW/fineweb-edu", "sample-10BT", "v1.2.0")


def test_local_training_files_are_named_in_the_body_not_the_metadata(tmp_path):
    r = pretrain_run(name="local")
    r["data"].update(train_files=["data/a.txt", "data/b.txt"],  # dataset_name is ignored
                     validation_files="data/val.txt")  # a YAML config may give one string
    content, card = write_and_load(tmp_path, r)
    assert card.data.datasets is None and "datasets:" not in content
    assert "| data | data/a.txt, data/b.txt |" in card.text
    assert "| held-out data | data/val.txt |" in card.text
    loss = results_by_metric(card)["loss"]
    assert (loss.dataset_type, loss.dataset_name, loss.dataset_split) == \
        ("text", "data/val.txt", "validation")


def test_sft_card_with_hub_base_model(tmp_path):
    r = sft_run("openai-community/gpt2", final_eval={
        "eval_loss": 1.25, "eval_ppl": math.exp(1.25),  # the loss is final_eval_loss's
        "eval_exact_match": 0.4, "eval_hellaswag_acc": 0.26, "eval_hellaswag_acc_norm": 0.27,
        "eval_hellaswag_n": 10042, "eval_runtime": 12.5,  # a count and a timing
        "eval_bleu": None, "step": 120, "tokens": 122_880})
    content, card = write_and_load(tmp_path, r)
    assert content.startswith(HEADER)
    data = card.data
    assert data.base_model == "openai-community/gpt2"
    assert data.license is None and "license:" not in content
    assert data.datasets is None, "local records are not a Hub dataset"
    assert data.tags == ["gpt2", "causal-lm", "sft"] and data.model_name == "sft-demo"
    results = card.data.eval_results
    assert sorted(r.metric_type for r in results) == \
        ["acc", "acc_norm", "exact_match", "loss", "perplexity"], "None and non-eval_ skipped"
    res = results_by_metric(card)
    assert res["loss"].metric_value == 1.25
    assert res["perplexity"].metric_value == pytest.approx(math.exp(1.25))
    assert res["exact_match"].metric_value == 0.4
    for name in ("loss", "perplexity", "exact_match"):
        assert res[name].task_type == "text-generation"
        assert (res[name].dataset_type, res[name].dataset_name) == \
            ("json", "held-out part of data/sft/train.jsonl")
    for name, value in (("acc", 0.26), ("acc_norm", 0.27)):
        assert res[name].metric_value == value
        assert (res[name].dataset_type, res[name].dataset_name, res[name].dataset_split) == \
            ("Rowan/hellaswag", "HellaSwag", "validation")
    body = card.text
    assert "- sft" in content and "| data | data/sft/train.jsonl |" in body
    link = "[`openai-community/gpt2`](https://huggingface.co/openai-community/gpt2)"
    assert f"**Base model:** {link}" in body
    for row in ("| eval exact match | 0.4000 |", "| HellaSwag acc | 0.2600 |",
                "| HellaSwag acc_norm | 0.2700 |", "| final eval loss | 1.2500 |"):
        assert row in body, row
    assert "bleu" not in content and "runtime" not in content and "10042" not in content
    assert body.count("final eval loss") == 1
    assert 'model="outputs/sft"' in body


def test_lm_eval_task_results_name_their_task(tmp_path):
    """--eval_tasks with lm-eval tasks: each metric is on its task's data, not the held-out
    text (a task whose name extends another's, demo_choice_x beside demo_choice, kept apart)."""
    r = pretrain_run(final_eval={"eval_demo_choice_acc": 0.5, "eval_demo_choice_x_acc": 0.25,
                                 "eval_demo_perplexity_word_perplexity": 88.0})
    r["evaluation"] = {"eval_tasks": ["hellaswag", "demo_choice", "demo_choice_x",
                                      "demo_perplexity"]}
    content, card = write_and_load(tmp_path, r)
    got = {(e.dataset_type, e.metric_type): e.metric_value for e in card.data.eval_results
           if e.metric_type != "loss" and e.metric_type != "perplexity"}
    assert got == {("demo_choice", "acc"): 0.5, ("demo_choice_x", "acc"): 0.25,
                   ("demo_perplexity", "word_perplexity"): 88.0}
    assert "| demo_choice acc | 0.5000 |" in card.text


@pytest.mark.parametrize("where", ["existing", "relative", "absolute"])
def test_sft_card_with_local_base_model(tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "pre").mkdir(parents=True)
    base = {"existing": "outputs/pre", "relative": "./gone/pre",
            "absolute": str(tmp_path / "outputs" / "pre")}[where]
    content, card = write_and_load(tmp_path, sft_run(base))
    assert card.data.base_model is None and "base_model:" not in content
    assert f"**Base model:** `{base}` (a local folder, not on the Hub)" in card.text
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "perplexity"}


def test_none_and_non_finite_results_are_skipped(tmp_path):
    r = pretrain_run(final_eval_loss=None,
                     final_eval={"eval_exact_match": None, "eval_hellaswag_acc_norm": 0.3,
                                 "eval_rouge_l": float("nan"), "eval_f1": 0.5})
    content, card = write_and_load(tmp_path, r)
    res = results_by_metric(card)
    assert set(res) == {"acc_norm", "f1"}, "no loss, no perplexity, no None or NaN"
    assert res["f1"].metric_value == 0.5 and res["f1"].dataset_type == "Skylion007/openwebtext"
    assert "| final eval loss | n/a |" in card.text
    assert "| final eval perplexity | n/a |" in card.text
    assert "| eval f1 | 0.5000 |" in card.text and "rouge" not in content

    _, card = write_and_load(tmp_path, pretrain_run(final_eval_loss=None))
    assert card.data.eval_results is None, "nothing to report: no model-index"
    assert card.data.model_name == "owt"


def test_final_eval_loss_falls_back_to_final_eval(tmp_path):
    _, card = write_and_load(tmp_path, pretrain_run(final_eval_loss=None,
                                                    final_eval={"eval_loss": 2.0}))
    res = results_by_metric(card)
    assert res["loss"].metric_value == 2.0
    assert res["perplexity"].metric_value == pytest.approx(math.exp(2.0))


def test_model_card_does_not_change_the_run():
    r = RunRecord.from_dict(sft_run("gpt2", final_eval={"eval_exact_match": 0.1}))
    before = copy.deepcopy(r)
    model_card(r)
    assert r == before


def test_the_record_round_trips_through_its_dict_and_refuses_unknown_keys():
    r = sft_run("gpt2", final_eval={"eval_exact_match": 0.1})
    record = RunRecord.from_dict(r)
    assert record.model_info.params == 124_439_808 and record.task == "sft"
    assert record.data["block_size"] == 256 and record.training["output_dir"] == "outputs/sft"
    assert RunRecord.from_dict(record.to_dict()) == record
    assert record.to_dict() == {**r, "versions": {}, "distributed": {}, "skipped_steps": 0,
                                "first_eval": {}, "first_eval_loss": 10.98}
    assert "stopped" not in record.to_dict() and "train_examples" not in \
        RunRecord.from_dict(pretrain_run()).to_dict(), "unset optional fields are left out"
    with pytest.raises(ValueError, match=r"not fields of a run record: \['final_loss'\]"):
        RunRecord.from_dict({**r, "final_loss": 1.0})


def test_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    assert hub_name("gpt2") == "gpt2"
    assert hub_name("Skylion007/openwebtext") == "Skylion007/openwebtext"
    for local in ("corpus", "/data/corpus", "./x", "../x", "~/x", "a/b/c", "", None, "a b"):
        assert hub_name(local) is None, local


def test_card_of_a_real_run(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir, monkeypatch):
    """train_clm.py writes README.md; with extra final metrics in the run dict too."""
    from clm import outputs

    real = outputs.model_card
    monkeypatch.setattr(outputs, "model_card", lambda r: real(dataclasses.replace(
        r, final_eval={"eval_exact_match": 0.125, "eval_hellaswag_acc_norm": None})))
    out = tmp_path / "tiny"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=2, eval_steps=2,
                 num_samples=0, license="apache-2.0"))
    content = (out / "README.md").read_text()
    assert content.startswith(HEADER)
    card = ModelCard.load(out / "README.md")
    last = [r for r in metrics(out) if "eval_loss" in r][-1]
    res = results_by_metric(card)
    assert set(res) == {"loss", "perplexity", "exact_match"}
    assert res["loss"].metric_value == pytest.approx(last["eval_loss"])
    assert res["perplexity"].metric_value == pytest.approx(last["eval_ppl"])
    assert res["exact_match"].metric_value == 0.125
    assert res["loss"].dataset_name == f"held-out part of {corpus_dir}"
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert card.data.datasets is None, "a local folder is not a Hub dataset"
    assert card.data.model_name == "tiny" and "pretraining" in card.data.tags
    assert f"| final eval loss | {last['eval_loss']:.4f} |" in card.text
    assert "| eval exact match | 0.1250 |" in card.text
