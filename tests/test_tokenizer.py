"""The demo tokenizer: byte-level BPE saved as a transformers folder, trained on training docs only."""

from transformers import AutoTokenizer

from clm.config import DataConfig
from clm.data import is_heldout
from clm.tokenizer import training_texts


def test_saved_folder_loads_with_auto_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 400
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    text = "Grüße, naïve café — 東京 ☃ doc12 tabs\tand\nnewlines"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text, "byte-level BPE round-trips any text"
    assert tok.eos_token_id not in ids, "no special tokens are added to documents"


def test_training_texts_exclude_heldout_documents(corpus_dir, corpus_docs):
    cfg = DataConfig(dataset_name=str(corpus_dir), validation_split_percentage=30)
    texts = [t for batch in training_texts(cfg) for t in batch]
    held = [d for d in corpus_docs if is_heldout(d, 30)]
    assert held and not set(held) & set(texts)
    assert set(texts) | set(held) == set(corpus_docs)
