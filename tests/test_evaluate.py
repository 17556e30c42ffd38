"""clm.evaluate (HellaSwag): the module's scores against a plain one-at-a-time computation, batch
sizes, --limit, ranks' shares, training mode, and one-line errors for bad data."""

import json
import subprocess
import sys

import pytest
import torch

import clm.evaluate as ev
from clm.config import UsageError, run_cli
from clm.parallel import Topology
from clm.evaluate import EvalConfig, hellaswag_counts, hellaswag_scores, load_hellaswag, \
    score_hellaswag
from helpers import ROOT

N_POSITIONS = 128

# Made-up examples. Endings of very different lengths (a summed log-likelihood favours short
# ones, a mean does not), one label as a string (as on the Hub), one context longer than the
# toy model's 128 positions (cut from the left).
EXAMPLES = [
    {"ctx": "A man is standing on a ladder next to a house. He",
     "endings": ["paints.", "climbs down the ladder slowly and carefully, holding the rails with "
                 "both hands the whole way.", "eats.", "is a cat sitting on the roof of a car."],
     "label": 1},
    {"ctx": "The chef puts the pan on the stove and",
     "endings": ["pours oil into it, waiting for it to heat up before adding onions.", "sings.",
                 "the.", "drives a truck down the highway"], "label": "0"},
    {"ctx": "Two girls are playing tennis in the park. The ball",
     "endings": ["flies over the net.", "is blue.", "bounces off the racket and lands "
                 "far outside the line, so the point goes to the other girl.", "x"], "label": 2},
    {"ctx": " ".join(["A long story about the river and the boats that sail on it every day."] * 6),
     "endings": ["The end.", "Then the rain came down over the water and the boats went home.",
                 "Boats.", "River river river."], "label": 1},
    {"ctx": "She opens the book to the first page. She",
     "endings": ["reads it.", "closes it again and puts it back on the shelf behind the desk.",
                 "flies.", "was."], "label": 0},
    {"ctx": "The dog runs across the field after the ball, and then",
     "endings": ["brings it back to its owner, wagging its tail.", "stops.", "a.",
                 "the dog the dog"], "label": 0},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A 2-layer, 64-dim GPT-2 with a wide init, so that its scores depend on the context."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=N_POSITIONS,
                        vocab_size=len(tokenizer), initializer_range=0.2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("eval_model")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    from clm.sampling import load_model

    return load_model(str(model_dir), "cpu", "float32")


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES)


def independent_scores(model, tokenizer, examples):
    """Per example ([summed], [mean]) log-likelihood of each ending: one sequence at a time,
    no padding, plain transformers."""
    out = []
    with torch.no_grad():
        for e in examples:
            ctx = tokenizer(e["ctx"], add_special_tokens=False)["input_ids"]
            sums, means = [], []
            for ending in e["endings"]:
                end = tokenizer(" " + ending, add_special_tokens=False)["input_ids"]
                ids = (ctx + end)[-(N_POSITIONS + 1):]  # the last token is only predicted
                logits = model(torch.tensor([ids[:-1]])).logits[0]
                logp = torch.log_softmax(logits.float(), dim=-1)
                start = len(ids) - len(end)
                total = sum(logp[j - 1, ids[j]].item() for j in range(start, len(ids)))
                sums.append(total)
                means.append(total / len(end))
            out.append((sums, means))
    return out


def best(values):
    return max(range(len(values)), key=lambda k: values[k])


def evaluate_cli(capsys, *argv):
    results = run_cli(ev.main, [EvalConfig], [str(a) for a in argv])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == results
    return results


def test_scores_match_independent_computation(loaded, model_dir, data_file, capsys):
    model, tokenizer = loaded
    assert len(tokenizer(EXAMPLES[3]["ctx"])["input_ids"]) > N_POSITIONS  # truncation is tested
    assert all(len(tokenizer(" " + x)["input_ids"]) < N_POSITIONS  # and each ending fits whole
               for e in EXAMPLES for x in e["endings"])
    ref = independent_scores(model, tokenizer, EXAMPLES)
    labels = [int(e["label"]) for e in EXAMPLES]
    acc = sum(best(s) == y for (s, _), y in zip(ref, labels)) / len(labels)
    acc_norm = sum(best(m) == y for (_, m), y in zip(ref, labels)) / len(labels)
    per_char = [[v / len(x) for v, x in zip(s, e["endings"])] for (s, _), e in zip(ref, EXAMPLES)]
    acc_norm_char = sum(best(c) == y for c, y in zip(per_char, labels)) / len(labels)
    # the data tells the three apart: some example's best ending differs between them
    assert any(best(s) != best(m) for s, m in ref)
    assert acc_norm != acc_norm_char

    got = evaluate_cli(capsys, "--model", model_dir, "--tasks", "hellaswag",
                       "--data_files", data_file, "--batch_size", 5, "--device", "cpu")
    assert got == {"hellaswag": {"acc": acc, "acc_norm": acc_norm,
                                 "acc_norm_char": acc_norm_char, "n": len(EXAMPLES)}}

    scores = score_hellaswag(model, tokenizer, load_hellaswag(str(data_file)), batch_size=5)
    assert [s["label"] for s in scores] == labels
    for s, (sums, means) in zip(scores, ref):
        assert s["sum_logprob"] == pytest.approx(sums, abs=1e-4)
        assert s["mean_logprob"] == pytest.approx(means, abs=1e-4)


def test_batch_size_does_not_change_scores(loaded, data_file):
    model, tokenizer = loaded
    examples = load_hellaswag(str(data_file))
    one = score_hellaswag(model, tokenizer, examples, batch_size=1)  # no padding at all
    three = score_hellaswag(model, tokenizer, examples, batch_size=3)  # padded, across examples
    for a, b in zip(one, three, strict=True):
        assert a["sum_logprob"] == pytest.approx(b["sum_logprob"], abs=1e-5)
        assert a["mean_logprob"] == pytest.approx(b["mean_logprob"], abs=1e-5)
    assert hellaswag_scores(model, tokenizer, examples, 1) == \
        hellaswag_scores(model, tokenizer, examples, 3)


def test_limit(model_dir, data_file, capsys):
    got = evaluate_cli(capsys, "--model", model_dir, "--data_files", data_file, "--limit", 2,
                       "--device", "cpu")
    assert got["hellaswag"]["n"] == 2
    assert [e["ctx"] for e in load_hellaswag(str(data_file), limit=2)] == \
        [e["ctx"] for e in EXAMPLES[:2]]


def test_cli_entry_point(model_dir, data_file):
    proc = subprocess.run([sys.executable, "-m", "clm.evaluate", "--model", str(model_dir),
                           "--tasks", "hellaswag", "--data_files", str(data_file), "--limit", "3",
                           "--batch_size", "4", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"hellaswag"} and result["hellaswag"]["n"] == 3
    assert set(result["hellaswag"]) == {"acc", "acc_norm", "acc_norm_char", "n"}


def test_ranks_share_the_examples(loaded, data_file, monkeypatch):
    """Two ranks, simulated: each scores its share, both run the same number of forward passes
    (the rank with fewer sequences runs an uncounted one), and the counts add up to the whole."""
    model, tokenizer = loaded
    examples = load_hellaswag(str(data_file))[:5]  # rank 0: 3 examples (4 passes), rank 1: 2 (3)
    whole = hellaswag_counts(model, tokenizer, examples, batch_size=3)
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: reduced.append(t.tolist()))
    passes = []
    for rank in (0, 1):
        calls = []
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        try:
            hellaswag_counts(model, tokenizer, examples, batch_size=3,
                             topology=Topology(rank=rank, world_size=2))
        finally:
            hook.remove()
        passes.append(len(calls))
    assert passes == [4, 4]
    assert [r[3] for r in reduced] == [3, 2]
    assert tuple(map(sum, zip(*reduced))) == whole


def test_training_mode_restored_and_wrapped_model(loaded, data_file):
    model, tokenizer = loaded
    examples = load_hellaswag(str(data_file))

    class Wrapper(torch.nn.Module):  # like DDP: the model as .module, no .config of its own
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    expected = hellaswag_scores(model, tokenizer, examples, 4)
    wrapped = Wrapper(model)
    wrapped.train()
    try:
        assert hellaswag_scores(wrapped, tokenizer, examples, 4, device="cpu") == expected
        assert wrapped.training and model.training
    finally:
        model.eval()
    assert hellaswag_scores(model, tokenizer, examples, 4) == expected and not model.training


BAD = [
    ("missing.jsonl", None, "no such file"),
    ("notjson.jsonl", [EXAMPLES[0], "{not json"], "line 2 is not valid JSON"),
    ("noctx.jsonl", [{k: v for k, v in EXAMPLES[0].items() if k != "ctx"}], "line 1 has no 'ctx'"),
    ("three.jsonl", [EXAMPLES[0], EXAMPLES[1], {**EXAMPLES[2], "endings": ["a", "b", "c"]}],
     "line 3: 'endings' must be a list of 4 strings"),
    ("label.jsonl", [EXAMPLES[0], {**EXAMPLES[1], "label": 4}], "line 2: 'label' 4 is out of range"),
    ("strlabel.jsonl", [{**EXAMPLES[1], "label": "x"}], "line 1: 'label' must be an integer"),
    ("empty.jsonl", [], "holds no records"),
]


@pytest.mark.parametrize("name,records,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_a_one_line_error(tmp_path, capsys, name, records, message):
    path = tmp_path / name
    if records is not None:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                for r in records))
    with pytest.raises(UsageError, match=message):
        load_hellaswag(str(path))
    # through the CLI, before any model is loaded (the model folder does not exist)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ev.main, [EvalConfig], ["--model", str(tmp_path / "no_model"),
                                        "--data_files", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --data_files {path}"), err
    assert message in err[0] and err[0].endswith(")"), err


def test_unknown_task(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ev.main, [EvalConfig], ["--model", "x", "--tasks", "hellaswag,mmlu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tasks mmlu" in err[0] and "hellaswag" in err[0], err


def test_pretraining_logs_hellaswag_at_each_evaluation(tmp_path, data_file, corpus_dir,
                                                       tokenizer_dir, toy_config_dir):
    import train_clm
    from clm.config import run_cli
    from clm.evaluate import BenchmarkEvalConfig
    from helpers import TYPES, metrics, toy_args

    out = tmp_path / "pre"
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=4, eval_steps=2,
                    num_samples=0) + ["--eval_tasks", "hellaswag", "--eval_tasks_data_files",
                                      str(data_file), "--eval_tasks_limit", "5"]
    result = run_cli(train_clm.main, TYPES + [BenchmarkEvalConfig], argv)
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["eval_hellaswag_acc_norm"] <= 1 for r in evals)
    # the final figures are the saved model's, scored on its own by the CLI's function
    from clm.sampling import load_model

    model, tok = load_model(str(out), "cpu", "float32")
    alone = hellaswag_scores(model, tok, load_hellaswag(str(data_file), 5), batch_size=3)
    assert evals[-1]["eval_hellaswag_acc"] == alone["acc"]
    assert evals[-1]["eval_hellaswag_acc_norm"] == alone["acc_norm"]
    assert result["final_eval"]["eval_hellaswag_acc_norm"] == alone["acc_norm"]
    assert "HellaSwag" in (out / "README.md").read_text()


def test_unknown_eval_task_stops_pretraining_before_work(tmp_path, capsys, corpus_dir,
                                                         tokenizer_dir, toy_config_dir):
    import train_clm
    from clm.config import run_cli
    from clm.evaluate import BenchmarkEvalConfig
    from helpers import TYPES, toy_args

    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "o") + [
        "--eval_tasks", "hellaswag,demo_choice,no_such_task"]
    with pytest.raises(SystemExit) as e:
        run_cli(train_clm.main, TYPES + [BenchmarkEvalConfig], argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --eval_tasks no_such_task (not hellaswag" in err[0], err
    assert not (tmp_path / "o").exists()


def test_lm_eval_tasks_without_lm_eval_are_one_line_errors(tmp_path, capsys, corpus_dir,
                                                            tokenizer_dir, toy_config_dir,
                                                            monkeypatch):
    import sys

    import train_clm
    from clm.config import run_cli
    from clm.evaluate import BenchmarkEvalConfig
    from helpers import TYPES, toy_args

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as if not installed
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "o") + [
        "--eval_tasks", "demo_choice"]
    with pytest.raises(SystemExit) as e:
        run_cli(train_clm.main, TYPES + [BenchmarkEvalConfig], argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "lm-evaluation-harness, which is not installed (pip install 'lm-eval>=0.4.13'" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_lm_eval_tasks_run_in_the_loop_on_the_training_model(tmp_path, corpus_dir,
                                                              tokenizer_dir):
    """--eval_tasks with the shipped lm-eval tasks (multiple choice, rolling perplexity,
    generation) beside hellaswag: logged at each evaluation; the final figures are lm-eval's on
    the saved folder; and the run trains exactly as without them (with dropout on: the model
    goes back to training mode, the RNG states are left as they were)."""
    import train_clm
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, GPT2Config

    from clm import harness
    from clm.config import run_cli
    from clm.evaluate import BenchmarkEvalConfig
    from clm.sampling import load_model
    from helpers import TYPES, metrics, toy_args

    dropout = tmp_path / "dropout_config"
    GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, resid_pdrop=0.1,
               embd_pdrop=0.1, attn_pdrop=0.1).save_pretrained(dropout)
    tasks = ["demo_choice", "demo_perplexity", "demo_generate"]
    runs = {}
    for name, extra in (("with", ["--eval_tasks", ",".join(tasks), "--eval_tasks_limit", "4"]),
                        ("without", [])):
        runs[name] = tmp_path / name
        run_cli(train_clm.main, TYPES + [BenchmarkEvalConfig], toy_args(
            corpus_dir, tokenizer_dir, dropout, runs[name], max_steps=4, eval_steps=2,
            num_samples=0) + extra)
    evals = [r for r in metrics(runs["with"]) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("eval_demo_choice_acc", "eval_demo_choice_acc_norm",
                "eval_demo_perplexity_word_perplexity", "eval_demo_perplexity_bits_per_byte",
                "eval_demo_generate_exact_match"):
        assert all(key in r for r in evals), (key, evals[-1])
    train = lambda out: [(r["loss"], r["grad_norm"]) for r in metrics(out) if "loss" in r]  # noqa: E731
    assert train(runs["with"]) == train(runs["without"])

    model, tok = load_model(str(runs["with"]), "cpu", "float32")
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8),
                          tasks=tasks, limit=4, bootstrap_iters=0,
                          task_manager=harness.task_manager())
    assert evals[-1]["eval_demo_choice_acc"] == out["results"]["demo_choice"]["acc,none"]
    assert evals[-1]["eval_demo_perplexity_word_perplexity"] == pytest.approx(
        out["results"]["demo_perplexity"]["word_perplexity,none"], rel=1e-5)


def test_loglikelihoods_and_accuracies_are_lm_evals(loaded, data_file, tmp_path):
    """lm-evaluation-harness scores the same local items on the same in-memory model (HFLM):
    each ending's log-likelihood is ours, its acc our acc, its acc_norm our acc_norm_char; the
    long context is cut as lm-eval cuts it."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = loaded
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_hellaswag.yaml").write_text(
        "task: local_hellaswag\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data_file}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: '{{label | int}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=["local_hellaswag"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    samples = sorted(out["samples"]["local_hellaswag"], key=lambda r: r["doc_id"])
    theirs = [[resp[0][0] for resp in r["resps"]] for r in samples]
    ours = score_hellaswag(model, tokenizer, load_hellaswag(str(data_file)), batch_size=4)
    assert len(theirs) == len(ours) == len(EXAMPLES)
    for mine, other in zip(ours, theirs):
        assert mine["sum_logprob"] == pytest.approx(other, abs=1e-4)
    result, scores = out["results"]["local_hellaswag"], hellaswag_scores(
        model, tokenizer, load_hellaswag(str(data_file)), 4)
    assert (result["acc,none"], result["acc_norm,none"]) == (scores["acc"],
                                                              scores["acc_norm_char"])
