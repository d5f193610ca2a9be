"""Bearer tokens: Admin always needs one; Inference only when tokens are configured for it.
Tokens come from config, a secret file, or MOEFLEET_ADMIN_TOKEN / MOEFLEET_INFERENCE_TOKEN."""

import hmac
import os
import secrets
from dataclasses import dataclass

from moefleet.cluster.errors import AuthError


def _read_tokens(path: str | None) -> list[str]:
    if not path:
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class TokenAuth:
    admin_tokens: tuple[str, ...]
    inference_tokens: tuple[str, ...]  # empty: Inference is open

    @classmethod
    def from_sources(cls, admin_tokens=(), admin_token_file=None, inference_tokens=(), inference_token_file=None,
                     generate_admin_token: bool = True) -> "TokenAuth":
        admin = list(admin_tokens) + _read_tokens(admin_token_file)
        if os.environ.get("MOEFLEET_ADMIN_TOKEN"):
            admin.append(os.environ["MOEFLEET_ADMIN_TOKEN"])
        inference = list(inference_tokens) + _read_tokens(inference_token_file)
        if os.environ.get("MOEFLEET_INFERENCE_TOKEN"):
            inference.append(os.environ["MOEFLEET_INFERENCE_TOKEN"])
        if not admin and generate_admin_token:
            # Hex, not token_urlsafe: one urlsafe token in 64 starts with "-", and
            # `moefleet admin --token <it>` then read it as an option (argparse: expected one argument).
            admin.append(secrets.token_hex(24))
        return cls(tuple(admin), tuple(inference))

    @staticmethod
    def _matches(header: str | None, tokens: tuple[str, ...]) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer "):].strip().encode()
        return any(hmac.compare_digest(given, t.encode()) for t in tokens)

    def check_admin(self, header: str | None) -> None:
        if not self._matches(header, self.admin_tokens):
            raise AuthError("Admin needs a valid bearer token (authorization: Bearer <token>)")

    def check_inference(self, header: str | None) -> None:
        if self.inference_tokens and not self._matches(header, self.inference_tokens):
            raise AuthError("Inference needs a valid bearer token (authorization: Bearer <token>)")
