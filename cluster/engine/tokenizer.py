"""The tokenizer and chat template of a checkpoint directory."""

import json
import os

from moefleet.models.errors import CheckpointError


class Tokenizer:
    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")) and not os.path.isfile(
                os.path.join(model_dir, "tokenizer_config.json")):
            raise CheckpointError(model_dir, "tokenizer.json", "no tokenizer files in the model directory")
        self.hf = AutoTokenizer.from_pretrained(model_dir)
        # The `tokenizers` tokenizer underneath: one decoder for one-shot and streamed text, so
        # the two agree byte for byte (transformers' optional clean-up of spaces, meant for
        # WordPiece and skipped for BPE, is not prefix-stable and could not be streamed).
        self.backend = getattr(self.hf, "backend_tokenizer", None)
        if self.backend is None:
            raise CheckpointError(model_dir, "tokenizer.json", "needs a fast (tokenizers) tokenizer for streamed text")
        self.eos_token_ids = set()
        if self.hf.eos_token_id is not None:
            self.eos_token_ids.add(self.hf.eos_token_id)
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            self.eos_token_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           return_dict=False)
