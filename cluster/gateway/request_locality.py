"""Request shuffling at the gateway: a request's predicted expert locality per replica, from the
table the controller publishes (cluster/control/speculation.py, GatewayLocality). Prompts that
arrive as text are tokenized here with the checkpoint's own tokenizer (the `tokenizers` library
alone: no model, a few microseconds per short prompt), so the gateway scores what the replica will
run. Without a table, or without the tokenizer file, requests are routed as before."""

import logging
import os

from moefleet.cluster.messages import GenerateRequest

log = logging.getLogger(__name__)


class RequestLocality:
    """Callable as ReplicaPool.locality: request -> {replica id: share} or None."""

    def __init__(self):
        self.locality = None  # the controller's GatewayLocality, refreshed by the gateway
        self._tokenizer = None
        self._tokenizer_dir: str | None = None

    def update(self, locality) -> None:
        if locality is not None and locality.model_dir != self._tokenizer_dir:
            self._tokenizer_dir, self._tokenizer = locality.model_dir, _load_tokenizer(locality.model_dir)
        self.locality = locality

    def __call__(self, request: GenerateRequest) -> dict[str, float] | None:
        locality = self.locality
        if locality is None:
            return None
        if request.prompt_token_ids is not None:
            tokens = request.prompt_token_ids
        elif self._tokenizer is not None and request.prompt:
            tokens = self._tokenizer.encode(request.prompt, add_special_tokens=False).ids
        else:
            return None
        return locality.replica_scores(tokens)


def _load_tokenizer(model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    except Exception as e:  # a gateway on a node without the checkpoint: text prompts go unscored
        log.warning("request shuffling scores token-id prompts only: no tokenizer at %s (%s)", path, e)
        return None
