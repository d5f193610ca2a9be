"""A small byte-level BPE tokenizer trained locally, so generated checkpoints need no model hub."""

import inspect
import json
import os
import textwrap

SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus() -> list[str]:
    """English text available offline: the docstrings of a fixed set of standard-library modules."""
    import collections, functools, itertools, json as json_mod, os as os_mod, pathlib, re, string, textwrap as tw  # noqa: E401
    texts = []
    for module in (collections, functools, itertools, json_mod, os_mod, pathlib, re, string, tw, inspect):
        for _, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.append(textwrap.dedent(doc))
    texts.append("The quick brown fox jumps over the lazy dog. Hello, world! Once upon a time there was a model.")
    return texts


def train_tokenizer(out_dir: str, vocab_size: int = 1024) -> int:
    """Train and save tokenizer files into out_dir (tokenizer.json, tokenizer_config.json).
    Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        json.load(f)  # written and readable
    return tokenizer.get_vocab_size()
