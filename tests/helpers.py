"""Helpers shared by the tests that run train_clm.main on a toy model."""

from pathlib import Path

import torch

import train_clm
from clm.config import DataConfig, ModelConfig, TrainingConfig, run_cli
from clm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TYPES = [DataConfig, ModelConfig, TrainingConfig]


def toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **overrides):
    """train_clm.py arguments for a 2-layer, 64-dim model on the test corpus; override any."""
    args = {"dataset_name": corpus_dir, "tokenizer_name": tokenizer_dir,
            "config_name": toy_config_dir, "output_dir": out, "block_size": 32,
            "validation_split_percentage": 10, "dataloader_num_workers": 0,
            "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
            "max_steps": 6, "eval_steps": 3, "logging_steps": 1, "warmup_steps": 2,
            "learning_rate": 3e-3, "min_lr": 3e-4, "num_samples": 2,
            "sample_max_new_tokens": 8, "seed": 0}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def torchrun(cwd, script, args, nproc: int = 2) -> str:
    """`script` (a path under the repository) under torchrun: a real gloo process group of
    `nproc` processes. Returns stdout; fails the test with stderr's tail if it exits non-zero."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def world_of(out) -> tuple[int, int]:
    """The world size a run recorded, and the process group's (the run's own if it had none)."""
    import yaml

    cfg = yaml.safe_load((Path(out) / "run_config.yaml").read_text())
    return cfg["world_size"], cfg["distributed"].get("torch_world_size", cfg["world_size"])


def plan_items(state: dict) -> list[tuple]:
    """The shard pieces a saved data state (state/data_rank<R>.json) plans to read."""
    return [tuple(item) for w in state["workers"] for reader in w["start"]["plan"]
            for item in reader]


def read_plans(corpus_dir, states: list[dict], epoch: int = 0) -> list[set]:
    """The shard pieces each rank's saved data state (state/data_rank<R>.json) reads in pass
    `epoch` over `corpus_dir`: the resharded plan it carries, else the standard one."""
    from clm import data
    from clm.config import DataConfig

    num_shards = data.open_source(DataConfig(dataset_name=str(corpus_dir))).num_shards
    plans = []
    for s in states:
        workers = max(1, s["num_workers"])
        if any(w["start"] and w["start"]["plan"] for w in s["workers"]):
            plans.append(set(plan_items(s)))
            continue
        order = data.shard_order(num_shards, s["seed"], epoch, s["shuffle"])
        plans.append({tuple(item) for w in range(workers) for reader in data.stream_plan(
            order, workers * s["rank"] + w, workers * s["world_size"],
            s["readers"] if s["shuffle"] else 1) for item in reader})
    return plans


def run(argv):
    """train_clm.py in this process (the real main, through the real CLI parser)."""
    return run_cli(train_clm.main, TYPES, argv)


def metrics(out):
    return read_metrics(out)


def reset_accelerate():
    """A new Accelerator in this process starts from scratch, as in a fresh process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def assert_same_training(a, b, **schedule):
    """Two runs in `a` and `b` (output folders) trained the same: same steps and tokens, the same
    losses and gradient norms to float32 rounding, the same weights to what Adam does with it.

    Bitwise equality is what this machine gives, but not a promise across processes: the CPU
    BLAS may split a reduction differently from one process to the next (seen in CI), which moves
    a loss by one float32 ulp. Anything a resume can really get wrong (a lost Adam moment, the
    wrong learning rate or data) moves losses by 1e-3 or more, far outside rel 1e-5.
    `schedule`: the TrainingConfig fields of the learning-rate schedule (max_steps, warmup_steps,
    learning_rate, min_lr), which bound how far Adam can carry a rounding difference.
    """
    import pytest
    from safetensors.torch import load_file

    from clm.config import TrainingConfig

    ra, rb = metrics(a), metrics(b)
    train = lambda rs: [r for r in rs if "loss" in r]  # noqa: E731
    evals = lambda rs: [r for r in rs if "eval_loss" in r]  # noqa: E731
    ta, tb = train(ra), train(rb)
    assert [(r["step"], r["tokens"]) for r in ta] == [(r["step"], r["tokens"]) for r in tb]
    assert [r["loss"] for r in ta] == pytest.approx([r["loss"] for r in tb], rel=1e-5)
    # Adam hides a mis-scaled gradient in the weights; the gradient norm does not
    assert [r["grad_norm"] for r in ta] == pytest.approx([r["grad_norm"] for r in tb], rel=1e-5)
    ea, eb = evals(ra), evals(rb)
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    assert [r["eval_loss"] for r in ea] == pytest.approx([r["eval_loss"] for r in eb], rel=1e-5)
    assert_same_weights(load_file(Path(a) / "model.safetensors"),
                        load_file(Path(b) / "model.safetensors"),
                        TrainingConfig(output_dir=str(a), **schedule))


def assert_same_weights(wa, wb, cfg):
    """Adam moves a weight by lr * m / (sqrt(v) + eps) per step, |m / sqrt(v)| <= 1 here. Where
    a gradient is ~0, rounding in its last bits can flip that ratio, so such an element may differ
    by up to the summed learning rates; every other element must agree to 1e-5 + 1e-4 |w|. The
    key bias is such a place by construction: adding it shifts every score of a query's row by
    the same amount, which softmax ignores, so its exact gradient is 0 and Adam steps on
    rounding noise. Elsewhere at most 0.1% of a tensor may be in that state."""
    import torch

    from clm.optim import lr_at

    moved = sum(lr_at(step, cfg) for step in range(cfg.max_steps))
    assert wa.keys() == wb.keys()
    for name, w in wa.items():
        diff = (wb[name] - w).abs()
        assert diff.max() <= moved, (name, diff.max().item(), moved)
        close = diff <= 1e-5 + 1e-4 * w.abs()
        if name.endswith("attn.c_attn.bias"):  # [query | key | value]
            third = w.shape[0] // 3
            close = torch.cat([close[:third], close[2 * third:]])
        assert close.float().mean() >= 0.999, (name, close.float().mean().item())


TIMINGS = ("tokens_per_sec", "elapsed_s", "data_wait")


def assert_same_records(a, b):
    """Two metrics.jsonl record lists agree: the same keys and counts, floats to rel 1e-5
    (float32 rounding, see assert_same_training), timings ignored."""
    import pytest

    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        ra, rb = ({k: v for k, v in r.items() if k not in TIMINGS} for r in (ra, rb))
        assert ra.keys() == rb.keys(), (ra, rb)
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5), (k, ra, rb)
            else:
                assert ra[k] == rb[k], (k, ra, rb)


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def assert_export_is_the_model(checkpoint, final, out):
    """`python -m clm.export` of `checkpoint` (read from its training state) gives exactly the
    logits of the checkpoint's HF folder and of `final`, the final folder of the same step."""
    from clm import export

    exported = export.export(checkpoint, out)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(exported, ids), logits(checkpoint, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(exported, ids), logits(final, ids), rtol=0, atol=0)


class HostReads:
    """A counted stand-in, on CPU, for the host syncs of a training step on a GPU.

    On CUDA, reading a tensor's value on the host (`.item()`, `.tolist()`, `bool()`, `float()`,
    `int()`, `.numpy()`) waits for the device. Here every such read made while `loop.train`
    runs an optimizer step is counted, per step (the step ends in `loop._optimizer_step`);
    what is not the step's device work is left out: reading the data and the host-side batch
    preparation (`loop.prepare_batch` counts tokens on the host before the copy), evaluation
    and saving.
    `install(monkeypatch_like)` patches torch.Tensor and clm.loop; `per_step` lists the counts.
    """

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self):
        self.per_step, self.count, self.depth, self.off = [], 0, 0, 0

    def install(self, setattr_):
        from clm import data, loop, session

        for name in self.METHODS:
            setattr_(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        setattr_(data.BlockLoader, "__iter__", self._without_each(data.BlockLoader.__iter__))
        setattr_(loop, "prepare_batch", self._without(loop.prepare_batch))
        setattr_(session.Session, "evaluate", self._without(session.Session.evaluate))
        setattr_(session.Session, "save", self._without(session.Session.save))
        train, step = loop.train, loop._optimizer_step

        def counted_train(*args, **kwargs):
            self.depth += 1
            try:
                return train(*args, **kwargs)
            finally:
                self.depth -= 1

        def counted_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.per_step.append(self.count)
            self.count = 0
            return result

        setattr_(loop, "train", counted_train)
        setattr_(loop, "_optimizer_step", counted_step)

    def _counted(self, method):
        def read(tensor, *args, **kwargs):
            if self.depth and not self.off:
                self.count += 1
            return method(tensor, *args, **kwargs)
        return read

    def _without_each(self, make_iterator):
        """The batches of `make_iterator(...)`, each fetched uncounted (reading and tokenizing
        on the host, in this process when there are no DataLoader workers)."""
        def uncounted(*args, **kwargs):
            fetch = self._without(next)
            iterator = make_iterator(*args, **kwargs)
            try:
                while True:
                    try:
                        batch = fetch(iterator)
                    except StopIteration:
                        return
                    yield batch
            finally:
                iterator.close()
        return uncounted

    def _without(self, fn):
        def uncounted(*args, **kwargs):
            self.off += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.off -= 1
        return uncounted


def assert_folder_serves_users(folder, positions: int | None = None) -> None:
    """What the tools users take a folder to next read from it (transformers 4 and 5, lm-eval,
    optimum's ONNX export, llama.cpp's GGUF converter): the tokenizer under a class name both
    transformers majors know, its limits the model's (a long input truncates to the model's
    positions) and a pad token; and, for a model folder, `n_ctx`, and generation with a KV
    cache by default. `positions`: the model's, for a folder without config.json (adapters)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] in ("PreTrainedTokenizerFast", "GPT2TokenizerFast"), tok_cfg
    has_model = (folder / "config.json").is_file()
    if has_model:
        config = json.loads((folder / "config.json").read_text())
        assert config["use_cache"] is True and config["n_ctx"] == config["n_positions"], config
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen.get("use_cache", True) is True, gen
        positions = config["n_positions"]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.model_max_length == positions and tok.pad_token == tok.eos_token
    ids = tok("a word " * (4 * positions), truncation=True, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, positions)
    if has_model:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.config.use_cache and model(ids).logits.shape[1] == positions
        out = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        assert out.past_key_values is not None, "generation ran without a KV cache"
