"""Routing events from the per-token routed experts that vLLM and SGLang return, so that placements
can be planned from a deployment's own traffic.

What these read (from the projects' public docs, tests and source, as of mid 2026):

vLLM, server flag `--enable-return-routed-experts` (its "routed experts replay", R3):
- newer releases (docs "latest"; tests/entrypoints/openai): `/v1/completions` and
  `/inference/v1/generate` put `routed_experts` on each choice as base64 of a `.npy` file
  (`np.save`), shape [tokens, layers, top_k], from the first prompt token on;
  `/v1/chat/completions` gives nested lists for the generated part;
- v0.21 (docs "routed experts replay"): `prompt_routed_experts` [prompt_len, layers, top_k] on
  the response and `routed_experts` on each choice, as nested lists or as
  `{"encoding": "base64", "dtype": "int16", "shape": [...], "data": ...}`;
- token ids: `prompt_token_ids` on the response and `token_ids` on each choice, when the request
  asked for them (`return_token_ids`); else `usage` gives the counts and the tokens stay null;
- layers: vLLM 0.20 returned every decoder layer with zeros for dense ones (DeepSeek-V2-Lite's
  layer 0), the v0.21 docs say MoE layers only.
SGLang, server flag `--enable-return-routed-experts` and `return_routed_experts: true` per request:
- `/generate`: `meta_info.routed_experts`, base64 of the raw row-major buffer [tokens,
  num_hidden_layers, top_k], int32 unless `meta_info.routed_experts_dtype` says uint16 or uint8;
  the response carries no shape, so the caller gives num_layers and top_k (the model's
  `num_hidden_layers` and `num_experts_per_tok`); token ids: `output_ids`, and the prompt's only
  when saved with the response (`input_ids` or `prompt_token_ids`);
- the OpenAI API: `choices[i].sgl_ext.routed_experts` (or `sglext.routed_experts` on the response),
  the same encoding, counts from `usage`.

Alignment, the same in every form found: the last generated token is never forwarded, so the
rows end at the last forwarded position, prompt_len + generated_len - 2, whatever they start with
(the whole sequence, the generated part, or from SGLang's `routed_experts_start_len`); without
the counts, rows are taken to start at the prompt's first token.

Dense layers are dropped and the MoE layers renumbered from 0 (the trace's convention): given
as `moe_layers` (the model's layer indices), or else found in the data: a layer none of whose
rows holds top_k distinct experts is a placeholder. With top_k = 1 that test cannot see zero
placeholders; pass moe_layers there.

How sure: the field names, encodings and shapes above are from the projects' own tests and docs;
the alignment of chat routes (generated part ending at the last forwarded token) is inferred from a
vLLM test comparing them with the completions routes. Nothing here was run against a live server.
"""

import base64
import binascii
import io
from collections.abc import Sequence

import numpy as np

from moefleet.cluster.routing.trace import RoutingEvent

_NPY_MAGIC = b"\x93NUMPY"
_SGLANG_DTYPES = {"int32": np.int32, "uint16": np.uint16, "uint8": np.uint8}
_NO_ROUTES = ("no routed experts in the response (was the server started with --enable-return-routed-experts"
              "{}?)")


def from_vllm(obj: dict, seq: str | int, moe_layers: Sequence[int] | None = None) -> list[RoutingEvent]:
    """One vLLM response (completions, chat completions, /inference/v1/generate, as JSON) -> events.
    A response with several choices gives one sequence per choice, named f"{seq}.{index}"."""
    choices = _choices(obj, "vLLM")
    prompt_ids = _token_ids(obj, "prompt_token_ids")
    prompt_len = len(prompt_ids) if prompt_ids is not None else _usage(obj, "prompt_tokens")
    prompt_rows = None
    if obj.get("prompt_routed_experts") is not None:
        prompt_rows = _decode(obj["prompt_routed_experts"], "prompt_routed_experts")
        prompt_len = len(prompt_rows) if prompt_len is None else prompt_len
    events = []
    for index, choice in choices:
        if choice.get("routed_experts") is None and prompt_rows is None:
            raise ValueError(_NO_ROUTES.format(""))
        rows = _decode(choice.get("routed_experts") or [], "routed_experts")
        output_ids = _token_ids(choice, "token_ids")
        output_len = len(output_ids) if output_ids is not None else (
            _usage(obj, "completion_tokens") if len(choices) == 1 else None)
        if prompt_rows is not None:
            rows = _join(prompt_rows, rows)
        start = _first_position(len(rows), prompt_len, output_len)
        events += _events(rows, start, _sequence_name(seq, index, len(choices)), prompt_ids, prompt_len, output_ids,
                          moe_layers)
    return events


def from_sglang(obj: dict, seq: str | int, num_layers: int | None = None, top_k: int | None = None,
                moe_layers: Sequence[int] | None = None) -> list[RoutingEvent]:
    """One SGLang response (/generate, or the OpenAI API with sgl_ext, as JSON) -> events.
    num_layers, top_k: the model's num_hidden_layers and num_experts_per_tok (SGLang sends no shape).
    A response with several choices gives one sequence per choice, named f"{seq}.{index}"."""
    if not isinstance(obj, dict):
        raise ValueError(f"an SGLang response is a JSON object, got {type(obj).__name__}")
    asked = " and the request sent with return_routed_experts"
    if "meta_info" in obj:
        meta = obj["meta_info"]
        if not isinstance(meta, dict) or meta.get("routed_experts") is None:
            raise ValueError(_NO_ROUTES.format(asked))
        rows = _decode(meta["routed_experts"], "meta_info.routed_experts",
                       _sglang_dtype(meta.get("routed_experts_dtype")), num_layers, top_k)
        output_ids = _token_ids(obj, "output_ids")
        prompt_ids = _token_ids(obj, "input_ids") if "input_ids" in obj else _token_ids(obj, "prompt_token_ids")
        prompt_len = len(prompt_ids) if prompt_ids is not None else _count(meta, "prompt_tokens")
        output_len = len(output_ids) if output_ids is not None else _count(meta, "completion_tokens")
        start = _first_position(len(rows), prompt_len, output_len)
        return _events(rows, start, seq, prompt_ids, prompt_len, output_ids, moe_layers)
    choices = _choices(obj, "SGLang")
    prompt_ids = _token_ids(obj, "prompt_token_ids")
    prompt_len = len(prompt_ids) if prompt_ids is not None else _usage(obj, "prompt_tokens")
    shared = obj.get("sglext") or obj.get("sgl_ext") or {}
    events = []
    for index, choice in choices:
        value = (choice.get("sgl_ext") or {}).get("routed_experts")
        if value is None and len(choices) == 1:
            value = shared.get("routed_experts")
        if value is None:
            raise ValueError(_NO_ROUTES.format(asked))
        rows = _decode(value, "sgl_ext.routed_experts", np.int32, num_layers, top_k)
        output_ids = _token_ids(choice, "token_ids")
        output_len = len(output_ids) if output_ids is not None else (
            _usage(obj, "completion_tokens") if len(choices) == 1 else None)
        start = _first_position(len(rows), prompt_len, output_len)
        events += _events(rows, start, _sequence_name(seq, index, len(choices)), prompt_ids, prompt_len, output_ids,
                          moe_layers)
    return events


def _choices(obj, source: str) -> list[tuple[int, dict]]:
    if not isinstance(obj, dict):
        raise ValueError(f"a {source} response is a JSON object, got {type(obj).__name__}")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"a {source} response has a non-empty list of objects under 'choices'")
    return [(c["index"] if type(c.get("index")) is int else i, c) for i, c in enumerate(choices)]


def _sequence_name(seq: str | int, index: int, num_choices: int) -> str | int:
    return seq if num_choices == 1 else f"{seq}.{index}"


def _token_ids(holder: dict, key: str) -> list[int] | None:
    ids = holder.get(key)
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(f"'{key}' must be a list of token ids (integers >= 0)")
    return ids


def _count(holder: dict, key: str) -> int | None:
    value = holder.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"'{key}' must be an integer >= 0, got {value!r}")
    return value


def _usage(obj: dict, key: str) -> int | None:
    usage = obj.get("usage")
    return _count(usage, key) if isinstance(usage, dict) else None


def _sglang_dtype(name) -> type:
    if name is None:
        return np.int32
    if name not in _SGLANG_DTYPES:
        raise ValueError(f"meta_info.routed_experts_dtype must be one of {sorted(_SGLANG_DTYPES)}, got {name!r}")
    return _SGLANG_DTYPES[name]


def _decode(value, field: str, raw_dtype: type | None = None, num_layers: int | None = None,
            top_k: int | None = None) -> np.ndarray:
    """A routed-experts value in any of the forms above -> int64[R, L, K]."""
    if isinstance(value, list):
        if not value:
            return np.zeros((0, 0, 0), dtype=np.int64)
        try:
            rows = np.asarray(value)
        except ValueError:
            raise ValueError(f"'{field}': nested lists of uneven lengths") from None
    elif isinstance(value, dict):
        missing = [key for key in ("encoding", "dtype", "shape", "data") if key not in value]
        if missing or value["encoding"] != "base64":
            raise ValueError(f"'{field}': an encoded array has encoding 'base64', dtype, shape and data "
                             f"(missing {missing}, encoding {value.get('encoding')!r})")
        data = _base64(value["data"], field)
        try:
            rows = np.frombuffer(data, dtype=np.dtype(value["dtype"])).reshape(tuple(value["shape"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"'{field}': {e}") from None
    elif isinstance(value, str):
        data = _base64(value, field)
        if data.startswith(_NPY_MAGIC):
            try:
                rows = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, EOFError, OSError) as e:
                raise ValueError(f"'{field}': not a readable .npy array ({e})") from None
        elif raw_dtype is None:
            raise ValueError(f"'{field}': base64 that is not a .npy array")
        else:
            if num_layers is None or top_k is None or num_layers < 1 or top_k < 1:
                raise ValueError(f"'{field}' is a flat buffer with no shape: give num_layers and top_k (the model's "
                                 f"num_hidden_layers and num_experts_per_tok)")
            flat = np.frombuffer(data, dtype=raw_dtype)
            if len(flat) % (num_layers * top_k):
                raise ValueError(f"'{field}' holds {len(flat)} ids, not a multiple of num_layers x top_k = "
                                 f"{num_layers} x {top_k}")
            rows = flat.reshape(-1, num_layers, top_k)
    else:
        raise ValueError(f"'{field}' must be nested lists or base64, got {type(value).__name__}")
    if rows.ndim != 3 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"'{field}' must be integers shaped [tokens, layers, top_k], got {rows.dtype} {rows.shape}")
    return rows.astype(np.int64)


def _base64(text, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError(f"'{field}' is not valid base64") from None


def _join(prompt_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if len(rows) == 0:
        return prompt_rows
    if len(prompt_rows) and prompt_rows.shape[1:] != rows.shape[1:]:
        raise ValueError(f"prompt_routed_experts is [.., {prompt_rows.shape[1]}, {prompt_rows.shape[2]}] but "
                         f"routed_experts is [.., {rows.shape[1]}, {rows.shape[2]}]")
    return np.concatenate([prompt_rows, rows]) if len(prompt_rows) else rows


def _first_position(num_rows: int, prompt_len: int | None, output_len: int | None) -> int:
    """Rows end at the last forwarded token, prompt_len + output_len - 2 (see the module docstring)."""
    if prompt_len is None or output_len is None or num_rows == 0:
        return 0
    forwarded = prompt_len + output_len - 1
    if num_rows > forwarded + 1:
        raise ValueError(f"{num_rows} rows of routed experts for {prompt_len} prompt and {output_len} generated "
                         f"tokens: at most {forwarded} tokens were forwarded")
    return max(0, forwarded - num_rows)


def _moe_layer_indices(rows: np.ndarray, moe_layers: Sequence[int] | None) -> list[int]:
    num_layers = rows.shape[1]
    if moe_layers is not None:
        bad = [layer for layer in moe_layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range: the routes have {num_layers} layers")
        return sorted(set(moe_layers))
    return [layer for layer in range(num_layers) if _routed(rows[:, layer]).any()]


def _routed(rows: np.ndarray) -> np.ndarray:
    """rows: int64[R, K] -> bool[R]: holds K distinct experts (not a placeholder)."""
    ordered = np.sort(rows, axis=1)
    return (ordered[:, 0] >= 0) & np.all(ordered[:, 1:] != ordered[:, :-1], axis=1)


def _events(rows: np.ndarray, start: int, seq: str | int, prompt_ids: list[int] | None, prompt_len: int | None,
            output_ids: list[int] | None, moe_layers: Sequence[int] | None) -> list[RoutingEvent]:
    """rows: int64[R, L, K], row r at position start + r."""
    if prompt_len is not None and output_ids is not None and start + len(rows) == prompt_len + len(output_ids):
        rows = rows[:-1]  # a row for the last generated token, which no forward pass routed
    if len(rows) == 0:
        return []
    tokens = [None] * (start + len(rows))
    for position, token in enumerate((prompt_ids or [])[:len(tokens)]):
        tokens[position] = token
    if output_ids is not None and prompt_len is not None:
        for position, token in enumerate(output_ids[:max(0, len(tokens) - prompt_len)], start=prompt_len):
            tokens[position] = token
    events = []
    for ordinal, layer in enumerate(_moe_layer_indices(rows, moe_layers)):
        routed = _routed(rows[:, layer]).tolist()
        for r, (experts, real) in enumerate(zip(rows[:, layer].tolist(), routed)):
            if real:
                events.append(RoutingEvent(seq, start + r, tokens[start + r], ordinal, tuple(experts)))
    events.sort(key=lambda event: event.pos)
    return events
