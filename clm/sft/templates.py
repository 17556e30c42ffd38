"""Records into token ids and labels: the chat template, and the loss mask that covers only
completions and assistant turns (`--completion_only_loss`, the default).

    python finetune/run_sft.py --config configs/sft_demo.yaml

Chats are rendered with the tokenizer's chat template, or a plain one that is saved with the
model when the tokenizer has none; each turn's tokens are found by rendering the conversation up
to it, so the labels cover exactly the assistant's text and its end token. Special-token text
inside a record is data, never a real special token.
"""

from __future__ import annotations

import re

from ..errors import UsageError

# For tokenizers without a chat template (GPT-2's): role headers, each message ended by EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
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
