"""Train a GPT-2-style byte-level BPE tokenizer on a corpus's training split.

    python -m clm.tokenizer --dataset_name data/demo_corpus --vocab_size 8192 --output_dir data/demo_tokenizer

It reads the documents through the same streaming source as training (so carved held-out
documents are excluded exactly as the run will exclude them), trains with `tokenizers`
(byte-level pre-tokenizer and decoder, `<|endoftext|>` as the only special token, used as
BOS/EOS/UNK like GPT-2's) and saves a transformers tokenizer folder that `AutoTokenizer` loads.
"""

from __future__ import annotations

import argparse
from .config import DataConfig, run_cli
from .errors import UsageError

EOS = "<|endoftext|>"


def training_texts(cfg: DataConfig, max_bytes: int | None = None, batch_size: int = 1000):
    """Yield batches of training-split texts, held-out documents excluded as in training."""
    from .data import heldout_source, is_heldout, open_source

    source = open_source(cfg, "train")
    carve = heldout_source(cfg) == "carve"
    seen = 0
    for batch in source.iter(batch_size=batch_size):
        texts = [t for t in batch[cfg.text_column]
                 if t and not (carve and is_heldout(t, cfg.validation_split_percentage))]
        yield texts
        seen += sum(len(t) for t in texts)
        if max_bytes and seen >= max_bytes:
            return


def train_tokenizer(cfg: DataConfig, vocab_size: int, output_dir: str,
                    max_bytes: int | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UsageError(f"--vocab_size {vocab_size} is too small (byte-level BPE needs at "
                         "least 257: 256 bytes and EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_texts(cfg, max_bytes), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                      unk_token=EOS, model_max_length=1024)
    wrapped.save_pretrained(output_dir)
    return wrapped


def main(argv=None):
    """`--vocab_size`, `--output_dir`, `--max_bytes` plus every DataConfig option."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--vocab_size", type=int, default=8192)
    own.add_argument("--output_dir", default="data/demo_tokenizer")
    own.add_argument("--max_bytes", type=int, default=None)
    args, rest = own.parse_known_args(argv)

    def _train(cfg: DataConfig):
        tok = train_tokenizer(cfg, args.vocab_size, args.output_dir, args.max_bytes)
        print(f"tokenizer: {len(tok)} tokens, saved to {args.output_dir}")

    run_cli(_train, [DataConfig], rest, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
