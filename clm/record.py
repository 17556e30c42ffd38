"""The run record: what a run is (its options, world, batch, model) and what it did (steps,
tokens, time, evaluations), as one typed value that run_config.yaml, the model card, the
trackers' config panel and the end-of-run summary all read.

    python -c "import yaml; from clm.record import RunRecord; print(RunRecord.from_dict(yaml.safe_load(open('outputs/demo/run_config.yaml'))).final_eval_loss)"

The options stay as the dicts `dataclasses.asdict` makes of the config dataclasses (one per
section: data, model, training, and lora and evaluation where the run has them), so the record
holds every option of either entry point without knowing them; everything the run derives or
measures is a typed field. `to_dict` is run_config.yaml's layout (and what `main()` returns);
`from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

SECTIONS = ("data", "model", "training", "evaluation", "lora")


@dataclass
class ModelInfo:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    params: int


@dataclass
class RunRecord:
    """One run: set when it starts, filled in as it goes, written at each checkpoint and at
    the end."""

    options: dict                 # section -> {option: value}
    world_size: int               # data-parallel processes
    global_batch_sequences: int
    tokens_per_step: int
    model_info: ModelInfo
    command: str
    versions: dict = field(default_factory=dict)
    name: str = ""
    task: str = "pretraining"     # or "sft"
    distributed: dict = field(default_factory=dict)   # runtime.describe: how it is distributed
    # finetuning's data (None for pretraining)
    train_examples: Optional[int] = None
    heldout_examples: Optional[int] = None
    skipped_examples: Optional[int] = None
    trainable_params: Optional[int] = None
    # what the run did
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0
    first_eval: dict = field(default_factory=dict)   # {"eval_<metric>": value}
    final_eval: dict = field(default_factory=dict)
    first_eval_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    stopped: Optional[str] = None  # the signal that stopped the run before max_steps

    @property
    def data(self) -> dict:
        return self.options.get("data", {})

    @property
    def model(self) -> dict:
        return self.options.get("model", {})

    @property
    def training(self) -> dict:
        return self.options.get("training", {})

    def to_dict(self) -> dict:
        """run_config.yaml's layout: the sections first, then the other fields; the optional
        ones (finetuning's counts, `stopped`) only when set."""
        out = dict(self.options)
        for f in dataclasses.fields(self):
            if f.name == "options":
                continue
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = dataclasses.asdict(value) if f.name == "model_info" else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """The record of a run_config.yaml (or of `to_dict`); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        unknown = set(d) - names - set(SECTIONS)
        if unknown:
            raise ValueError(f"not fields of a run record: {sorted(unknown)}")
        values = {k: v for k, v in d.items() if k in names}
        values["model_info"] = ModelInfo(**d["model_info"])
        return cls(options={k: d[k] for k in SECTIONS if k in d}, **values)

    def flat_options(self) -> dict:
        """The options as flat `section.name` scalars, for the trackers' config panels."""
        return {f"{section}.{k}": v for section in ("data", "model", "training")
                for k, v in self.options.get(section, {}).items()
                if isinstance(v, (int, float, str, bool))}
