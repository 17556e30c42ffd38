"""Finetuning data: records tokenized with a loss mask, padded into batches, dealt to ranks.

    python finetune/run_sft.py --config configs/sft_demo.yaml

Records are `{"text"}`, `{"prompt", "completion"}` or `{"messages": [{"role", "content"}]}`
(the format is read from the columns). Each becomes token ids and labels, -100 where no loss is
taken: with `--completion_only_loss` (the default) only completions and assistant turns are
learned. Chats are rendered with the tokenizer's chat template, or a plain one that is saved
with the model when the tokenizer has none; each turn's tokens are found by rendering the
conversation up to it, so the labels cover exactly the assistant's text and its end token.

Finetuning sets are small, so they are tokenized once, in memory. Every epoch is a seeded
permutation, dealt round-robin to ranks in equal shares, cut into fixed-size micro-batches,
each padded to its longest example. The loader's state is (epoch, batch): resuming is exact;
resuming on another number of processes deals the rest of the epoch again (`ExampleLoader`).
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .config import _help
from .errors import UsageError, first_line
from .data import BUILDERS, is_heldout, resolve_files
from .model import check_block_size

# For tokenizers without a chat template (GPT-2's): role headers, each message ended by EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
           "text": ("text",)}


@dataclass
class SFTDataConfig:
    """Where the finetuning records come from and how they become batches."""

    train_files: Optional[list[str]] = _help("Local .jsonl/.json/.parquet records (globs).",
                                             default=None)
    dataset_name: Optional[str] = _help("Hub dataset of records, instead of --train_files.",
                                        default=None)
    dataset_config_name: Optional[str] = _help("Configuration of --dataset_name.", default=None)
    validation_files: Optional[list[str]] = _help(
        "Held-out records (globs); else a hash carve of --validation_split_percentage.",
        default=None)
    validation_split_percentage: float = _help(
        "Percent of the records held out for evaluation when there are no validation files.",
        default=5.0)
    block_size: Optional[int] = _help(
        "Longest example (or packed sequence) in tokens; longer ones are truncated (default: "
        "the model's context length, at most 1024).", default=None)
    packing: bool = _help(
        "Pack several examples into each sequence of --block_size tokens, as TRL's packing: "
        "position ids restart at each example and attention stays within it, so no example "
        "sees another; fewer pad tokens, more examples per step.", default=False)
    completion_only_loss: bool = _help("Learn only completions and assistant turns (false: "
                                       "every token).", default=True)
    tokenizer_name: Optional[str] = _help("Tokenizer (default: --model_name_or_path's).",
                                          default=None)

    def __post_init__(self):
        if not self.train_files and not self.dataset_name:
            raise UsageError("no finetuning data (pass --train_files records.jsonl or "
                             "--dataset_name)")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"--block_size must be >= 2 (got {self.block_size})")
        if not 0 <= self.validation_split_percentage < 100:
            raise UsageError("--validation_split_percentage must be in [0, 100)")


@dataclass
class LoraArgs:
    """LoRA adapters (peft): train small low-rank updates, the base weights frozen."""

    use_peft: bool = _help("Train LoRA adapters instead of every weight.", default=False)
    lora_r: int = _help("Adapter rank.", default=16)
    lora_alpha: int = _help("Adapter scale numerator (the update is scaled by alpha / r).",
                            default=32)
    lora_dropout: float = _help("Dropout on the adapters' input.", default=0.05)
    lora_target_modules: Optional[list[str]] = _help(
        "Modules to adapt (default: GPT-2's c_attn, c_proj and c_fc; all-linear elsewhere).",
        default=None)
    merge_adapters: bool = _help(
        "Write the final folder as a plain model with the adapters merged in (the adapters "
        "alone go to adapter/); false: the final folder holds the adapters only.", default=True)

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise UsageError(f"--lora_r must be >= 1 and --lora_alpha > 0 (got {self.lora_r}, "
                             f"{self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")


GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def check_lora_targets(model_name_or_path: str, args: LoraArgs) -> None:
    """Refuse --lora_target_modules the model does not have, before its weights load."""
    if not args.use_peft or not args.lora_target_modules:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except Exception:
        return  # build_model reports an unloadable model in its own words
    with torch.device("meta"):  # the module tree without memory or initialisation
        names = {n.rsplit(".", 1)[-1] for n, _ in
                 AutoModelForCausalLM.from_config(config).named_modules()}
    unknown = [t for t in args.lora_target_modules if t not in names and t != "all-linear"]
    if unknown:
        raise UsageError(f"--lora_target_modules {unknown}: no such modules in "
                         f"{model_name_or_path} (for GPT-2: {' '.join(GPT2_LORA_TARGETS)})")


def add_lora(model, args: LoraArgs):
    """`model` wrapped with fresh LoRA adapters; only they require gradients."""
    from peft import LoraConfig, get_peft_model

    gpt2 = model.config.model_type == "gpt2"
    targets = args.lora_target_modules or (GPT2_LORA_TARGETS if gpt2 else "all-linear")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores weights transposed
                        task_type="CAUSAL_LM")
    # adapter_config.json names the base by model.name_or_path: a local folder is written as
    # an absolute path, so the adapters load from any working directory
    if model.name_or_path and os.path.isdir(model.name_or_path):
        model.name_or_path = os.path.abspath(model.name_or_path)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {targets}: {str(e).splitlines()[0]} (name "
                         "modules of this model)") from None


def merge_lora(model, output_dir):
    """Save the adapters to output_dir/adapter, then return the model with them merged in."""
    from pathlib import Path

    model.save_pretrained(Path(output_dir) / "adapter")
    return model.merge_and_unload()


def resolve_block_size(cfg: SFTDataConfig, model_name_or_path: str) -> int:
    """--block_size, or the model's context length (at most 1024) when it is not given, as
    HF's run_clm does; read from the model's config alone, before its weights load. An explicit
    value above the context is an error."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"could not load --model_name_or_path {model_name_or_path}: {first} "
                         "(pass a Hub name or a folder with a model)") from None
    context = getattr(config, "n_positions", None) or \
        getattr(config, "max_position_embeddings", None)
    if cfg.block_size is None:
        cfg.block_size = min(int(context or 1024), 1024)
    else:
        check_block_size(config, cfg.block_size)
    return cfg.block_size


# ----------------------------------------------------------------------------- records

def load_records(cfg: SFTDataConfig, split: str = "train") -> list[dict]:
    """The records of `split` ("train" or "validation") as dicts."""
    import datasets
    from datasets import load_dataset

    files = cfg.validation_files if split == "validation" else cfg.train_files
    option = f"--{split}_files"
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a small in-memory load: its bars are noise on stderr
    try:
        if files:
            names, builder = resolve_files(files, option)
            if builder == BUILDERS[".txt"]:
                raise UsageError(f"{option}: finetuning records must be .jsonl, .json "
                                 "or .parquet (one record a line or row)")
            for name in names:
                if name.endswith(".jsonl"):  # checked line by line, so errors name the line
                    _check_jsonl(name, option)
            ds = load_dataset(builder, data_files=names, split="train")
        else:
            ds = load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=split)
    except UsageError:
        raise
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"could not load the {split} records: {first} (check --train_files "
                         "or --dataset_name)") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    record_format(ds.column_names)
    records = list(ds)
    where = f"{option} {', '.join(names)}" if files else f"--dataset_name {cfg.dataset_name}"
    for i, record in enumerate(records):
        check_record(record, f"{where} record {i + 1}")
    return records


RECORD_FIX = ('each record is {"text": str}, {"prompt": str, "completion": str} or '
              '{"messages": [{"role": str, "content": str}, ...]}')


def check_record(record, where: str) -> None:
    """One-line UsageError naming `where` unless `record` is one of the three formats."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: not a JSON object ({RECORD_FIX})")
    if record.get("messages") is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise UsageError(f"{where}: 'messages' must be a non-empty list of "
                             f"{{\"role\": str, \"content\": str}} objects ({RECORD_FIX})")
    elif record.get("prompt") is not None or record.get("completion") is not None:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise UsageError(f"{where}: '{key}' must be a string ({RECORD_FIX})")
    elif not isinstance(record.get("text"), str):
        raise UsageError(f"{where}: the record has columns {sorted(record)} ({RECORD_FIX})")


def _check_jsonl(path: str, option: str) -> None:
    import json

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{option} {path} line {n}: not valid JSON "
                                 f"({getattr(e, 'msg', e)}; each line must be one JSON "
                                 "record)") from None
            check_record(record, f"{option} {path} line {n}")


def record_format(columns) -> str:
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    raise UsageError(f"records have columns {sorted(columns)} (each record needs 'text', "
                     "'prompt' and 'completion', or 'messages')")


def split_records(cfg: SFTDataConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: validation files, else a deterministic hash carve."""
    records = load_records(cfg)
    if cfg.validation_files:
        return records, load_records(cfg, "validation")
    if not cfg.validation_split_percentage:
        return records, []
    train, held = [], []
    for r in records:  # by content, so a record stays on its side however the file is ordered
        (held if is_heldout(repr(sorted(r.items())), cfg.validation_split_percentage)
         else train).append(r)
    return train, held


# ----------------------------------------------------------------------------- tokenize

def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


# Special-token text inside a record ("<|endoftext|>" quoted in a message) is data: encoded as
# the plain text it is, or it would become a real EOS mid-example, an end the record never had.
# Chats go through the template, which writes its own special tokens among the data's, so the
# data's are wrapped in these private-use characters before rendering and told apart after it.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _ids(tokenizer, text: str) -> list[int]:
    """`text`'s ids as plain text: no special token comes out of it."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _special_pattern(tokenizer) -> str:
    # the added tokens `split_special_tokens` leaves as text; longest first, so that a token
    # wins over a shorter one inside it
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))


def _quote(value, pattern: re.Pattern):
    """`value` (a message, its content, a list of parts) with special-token text wrapped."""
    if isinstance(value, str):
        return pattern.sub(lambda m: _OPEN + m.group(0) + _CLOSE, value)
    if isinstance(value, dict):
        return {k: _quote(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_quote(v, pattern) for v in value]
    return value


def _rendered_ids(tokenizer, text: str, quoted: re.Pattern) -> list[int]:
    """Ids of rendered chat text: the template's special tokens are tokens, quoted data is text.

    Text outside quotes is encoded as before (a chat without special-token text in its data
    gets the same ids as ever); each quoted token is encoded on its own as plain text.
    """
    ids, at = [], 0
    for m in quoted.finditer(text):
        if m.start() > at:
            ids += tokenizer(text[at:m.start()], add_special_tokens=False)["input_ids"]
        ids += _ids(tokenizer, m.group(1))
        at = m.end()
    if at < len(text):
        ids += tokenizer(text[at:], add_special_tokens=False)["input_ids"]
    return ids


def segments(record: dict, tokenizer) -> list[tuple[list[int], bool]]:
    """A record as (token ids, is completion) pieces, in order."""
    eos = tokenizer.eos_token_id
    if "messages" in record and record["messages"] is not None:
        render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
            msgs, tokenize=False, add_generation_prompt=gen)
        specials = _special_pattern(tokenizer)
        # the data's own private-use markers are wrapped too, so they come back as themselves
        markers = f"{_OPEN}|{_CLOSE}"
        wrap = re.compile(f"{specials}|{markers}" if specials else markers)
        quoted = re.compile(f"{_OPEN}({wrap.pattern}){_CLOSE}")
        text_ids = lambda text: _rendered_ids(tokenizer, text, quoted)  # noqa: E731
        pieces, done, messages = [], "", _quote(record["messages"], wrap)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = render(messages[:i], True)
                if prompt.startswith(done) and len(prompt) > len(done):
                    pieces.append((text_ids(prompt[len(done):]), False))
                    done = prompt
            full = render(messages[:i + 1], False)
            if not full.startswith(done):
                raise UsageError("the chat template does not render a conversation as a "
                                 "prefix of its continuation (use a template that does)")
            pieces.append((text_ids(full[len(done):]), message["role"] == "assistant"))
            done = full
        return pieces
    if "prompt" in record and record.get("completion") is not None:
        return [(_ids(tokenizer, record["prompt"]), False),
                (_ids(tokenizer, record["completion"]) + [eos], True)]
    return [(_ids(tokenizer, record["text"]) + [eos], True)]


def tokenize(records: list[dict], tokenizer, block_size: int,
             completion_only_loss: bool = True) -> tuple[list[dict], int]:
    """Examples {"input_ids", "labels"} (lists), truncated to block_size; returns them and the
    number of records dropped because no label token was left."""
    examples, dropped = [], 0
    for record in records:
        ids, labels = [], []
        for piece, learned in segments(record, tokenizer):
            ids += piece
            labels += piece if learned or not completion_only_loss else [-100] * len(piece)
        ids, labels = ids[:block_size], labels[:block_size]
        # the first label is never predicted (nothing comes before it)
        if not any(x != -100 for x in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, dropped


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example: pad tokens get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
             "labels": torch.full((len(examples), width), -100, dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(e["labels"])
    return batch


# ----------------------------------------------------------------------------- batches

def pack(examples: list[dict], block_size: int, generator: torch.Generator) -> list[list[dict]]:
    """Examples grouped into rows of at most `block_size` tokens, in a seeded random order.

    Best-fit decreasing: longest first, each into the row it fills most (TRL's default), which
    leaves a few percent of padding where sequential packing leaves a fraction of a row per
    row; the rows are then shuffled, so a batch is not all long or all short examples.
    """
    rows, free = [], []  # free: sorted (space left, row) of the rows that can take more
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, row = free.pop(i)
        else:
            space, row = block_size, len(rows)
            rows.append([])
        rows[row].append(e)
        if space - n >= 2:  # an example has at least 2 tokens (one of them a label)
            bisect.insort(free, (space - n, row))
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [rows[i] for i in order]


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict:
    """Rows of packed examples as one batch with `position_ids` restarting at each example.

    Without an attention mask and with restarting position ids, transformers' mask builder
    limits attention to each example (its packed-sequence detection; flash-attention-2 reads
    the same ids as variable-length sequences). Each example's first label is -100: after the
    loop's shift it would be the previous example's last target. The padding that ends a row is
    a segment of its own, with no labels; `attention_mask` marks it 0 only so the loop counts
    real tokens (it is not given to the model when `position_ids` are there).
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "labels": torch.full((len(rows), width), -100, dtype=torch.long),
             "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            batch["input_ids"][r, at:at + n] = torch.tensor(e["input_ids"])
            batch["labels"][r, at + 1:at + n] = torch.tensor(e["labels"][1:])
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
        batch["attention_mask"][r, :at] = 1
        batch["position_ids"][r, at:] = torch.arange(width - at)
    return batch


class ExampleLoader:
    """Endless micro-batches of this rank's share of each epoch; state is (epoch, batch).

    With `packing`, a micro-batch is `batch_size` rows of packed examples (`pack`), the rows of
    an epoch computed again from its permutation, so the state stays (epoch, batch).

    A run may continue on another number of processes (`restore`): the examples each saved
    rank was dealt in its current epoch and had not consumed yet are dealt again, round-robin
    in equal shares, to this run's ranks, each cutting its share into micro-batches (packed
    rows with `packing`) for the rest of that epoch; then the next epoch starts normally for
    the new layout. While in that rest the state also holds "rest", this rank's share (example
    indices), so that an exact resume or yet another change of processes continues from it.
    No example is trained on twice in an epoch; the only ones skipped are those an epoch's end
    always skips: fewer than `world_size` examples left over when the shares are made equal,
    and on each rank the fewer than `batch_size` examples (with packing: the examples of the
    fewer than `batch_size` rows) that do not fill a last micro-batch. (With packing, ranks
    pack different numbers of rows and may be in different epochs: a rank behind hands over
    the rest of its epoch and its shares of the epochs up to the newest one, which is the
    epoch the re-dealt rest belongs to: an example may then be in it once for each epoch.)
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, packing_block_size: Optional[int] = None):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.packing_block_size = packing_block_size
        self.epoch, self.batch = 0, 0
        self.rest: Optional[list[int]] = None  # this rank's share of a re-dealt epoch's rest
        if len(self._batches(0)) < 1:
            unit = "packed rows" if packing_block_size else "examples"
            raise UsageError(f"{len(examples)} training examples cannot fill one batch of "
                             f"{batch_size} {unit} on each of {world_size} processes (add data "
                             "or lower --per_device_train_batch_size)")

    def _order(self, epoch: int, rank: int, world_size: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.examples), generator=g).tolist()
        per_rank = len(self.examples) // world_size
        return perm[rank::world_size][:per_rank]

    def _units(self, epoch: int, rank: int, world_size: int,
               rest: Optional[list[int]] = None) -> list:
        """What rank `rank` of `world_size` trains on in `epoch`, in order: example indices, or
        with packing rows of them (all of them, the tail that fills no micro-batch included).
        `rest`: the indices it was dealt for the rest of a re-dealt epoch, instead of its share
        of the epoch's permutation."""
        mine = self._order(epoch, rank, world_size) if rest is None else list(rest)
        if not self.packing_block_size:
            return mine
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7919 * rank)
        # packed by length alone, so indices beside the lengths give the rows' indices
        keyed = [{"input_ids": self.examples[i]["input_ids"], "index": i} for i in mine]
        return [[e["index"] for e in row] for row in pack(keyed, self.packing_block_size, g)]

    def _batches(self, epoch: int, rest: Optional[list[int]] = None) -> list[list]:
        """This rank's micro-batches of `epoch`, each a list of examples (or of packed rows)."""
        units, size = self._units(epoch, self.rank, self.world_size, rest), self.batch_size
        if self.packing_block_size:
            units = [[self.examples[i] for i in row] for row in units]
        else:
            units = [self.examples[i] for i in units]
        return [units[i * size:(i + 1) * size] for i in range(len(units) // size)]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in the current epoch (with packing, each epoch packs differently)."""
        return len(self._batches(self.epoch, self.rest))

    def state_dict(self) -> dict:
        # batch_size: what `batch` counts in, for a resume with another micro-batch size
        state = {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size,
                 "seed": self.seed}
        if self.rest is not None:
            state["rest"] = list(self.rest)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        rest = state.get("rest")
        self.rest = None if rest is None else [int(i) for i in rest]

    def restore(self, states: list[dict]) -> Optional[str]:
        """Continue from every saved rank's state (`states`, in rank order).

        With as many ranks and the same micro-batch size, exactly (`load_state_dict`).
        Otherwise what each saved rank had not consumed of its current epoch (its epoch's
        micro-batches are made again to know which; with packing, a rank behind the newest
        epoch adds its shares of the epochs up to it) is interleaved in rank order, which for
        ranks in step is the epoch's own order, and dealt to this run's ranks for the rest of
        that epoch. Returns a line saying what was dealt.
        """
        for r, state in enumerate(states):
            if not isinstance(state, dict) or "epoch" not in state or "batch" not in state:
                raise UsageError(f"the data state of process {r} has no epoch and batch (not a "
                                 "finetuning checkpoint?)")
            if state.get("seed", self.seed) != self.seed:  # the epochs' permutations
                raise UsageError(f"the checkpoint's data state has seed={state['seed']} but this "
                                 f"run has seed={self.seed} (resume with the same --seed)")
        saved_size = lambda st: int(st.get("batch_size") or self.batch_size)  # noqa: E731
        if len(states) == self.world_size and saved_size(states[self.rank]) == self.batch_size:
            self.load_state_dict(states[self.rank])
            return None
        before, newest = len(states), max(int(st["epoch"]) for st in states)
        left = []  # each saved rank's examples not consumed, in the order it had them
        for r, st in enumerate(states):
            epoch, done = int(st["epoch"]), int(st["batch"]) * saved_size(st)
            units = self._units(epoch, r, before, st.get("rest"))
            if done > len(units):
                unit = "packed rows" if self.packing_block_size else "examples"
                raise UsageError(f"the data state of process {r} is past the end of epoch "
                                 f"{epoch} ({done} {unit} consumed, {len(units)} here; resume "
                                 "with the same data and --seed)")
            mine = units[done:]
            for later in range(epoch + 1, newest + 1):
                mine += self._units(later, r, before)
            left.append([i for u in mine for i in (u if self.packing_block_size else [u])])
        pool = [mine[at] for at in range(max(map(len, left), default=0)) for mine in left
                if at < len(mine)]
        share = len(pool) // self.world_size
        self.rest = pool[:share * self.world_size][self.rank::self.world_size]
        self.epoch, self.batch = newest, 0
        procs = lambda n: f"{n} process{'es' if n != 1 else ''}"  # noqa: E731
        return (f"data: the rest of epoch {newest} on {procs(before)}, {len(pool)} examples, is "
                f"dealt to {procs(self.world_size)} ({share} each); then epoch {newest + 1} "
                "starts")

    def __iter__(self):
        collate_fn = collate_packed if self.packing_block_size else collate
        while True:
            batches = self._batches(self.epoch, self.rest)
            while self.batch < len(batches):
                picked = batches[self.batch]
                self.batch += 1  # counted before it is handed out: the state says "next"
                yield collate_fn(picked, self.pad_id)
            self.epoch, self.batch, self.rest = self.epoch + 1, 0, None


def eval_batches(examples: list[dict], batch_size: int, pad_id: int) -> Optional[list[dict]]:
    """The held-out examples as batches, in order (loop.evaluate deals them to ranks)."""
    if not examples:
        return None
    return [collate(examples[i:i + batch_size], pad_id)
            for i in range(0, len(examples), batch_size)]
