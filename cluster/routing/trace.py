"""Routing traces: which experts each token chose in each MoE layer.

On disk (issue 26), one JSON object per line, plain or gzip (a name ending in `.gz`):

    {"seq": <str|int>, "pos": <int>, "token": <int|null>, "layer": <int>, "experts": [<int>, ...]}

`layer` counts MoE layers from 0 (dense layers are not numbered); `token` is null (or left out)
when the source lacks token ids. In memory a `RoutingTrace` keeps one row per event in numpy
columns: a large model's trace runs to millions of lines, so reading appends each line to typed
arrays and never holds a Python object per event.
"""

import gzip
import io
import json
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

PROGRESS_EVERY = 100_000  # lines between calls of read_trace's progress callback


class TraceFormatError(ValueError):
    """A trace line that is not a routing event; the message starts with `path:line:`."""


@dataclass(frozen=True)
class RoutingEvent:
    """One token at one MoE layer: the experts its router chose (in the router's order)."""

    seq: str | int
    pos: int
    token: int | None
    layer: int
    experts: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """A trace as columns, one row per event (N events, S sequences, K = most experts in an event).

    seq: int64[N], the sequence's index into seq_names (0..S-1, in first-seen order);
    seq_names: the sequences' ids as the trace gave them; pos: int64[N]; token: int64[N] (-1 where
    null); layer: int64[N]; experts: int64[N, K] (-1 pads events with fewer than K experts).
    num_layers is the highest layer + 1; num_experts the highest expert id + 1 unless given."""

    seq: np.ndarray
    seq_names: tuple
    pos: np.ndarray
    token: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    num_layers: int
    num_experts: int

    @property
    def num_events(self) -> int:
        return len(self.seq)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_names)

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @classmethod
    def from_events(cls, events: Iterable[RoutingEvent], num_experts: int | None = None) -> "RoutingTrace":
        """Checks each event as read_trace checks a line (ValueError naming the event's index)."""
        columns = _Columns(num_experts)
        for index, event in enumerate(events):
            try:
                columns.add(event.seq, event.pos, event.token, event.layer, list(event.experts))
            except TraceFormatError as e:
                raise ValueError(f"event {index}: {e}") from None
        if columns.count == 0:
            raise ValueError("events: no routing events")
        return columns.trace()

    def events(self) -> Iterator[RoutingEvent]:
        """The events back, in trace order."""
        for s, pos, token, layer, experts in zip(self.seq.tolist(), self.pos.tolist(), self.token.tolist(),
                                                 self.layer.tolist(), self.experts.tolist()):
            yield RoutingEvent(self.seq_names[s], pos, None if token < 0 else token, layer,
                               tuple(e for e in experts if e >= 0))

    def subset(self, keep: np.ndarray) -> "RoutingTrace":
        """keep: bool[N]. The kept events; sequence indices, names and sizes stay as they are."""
        return RoutingTrace(self.seq[keep], self.seq_names, self.pos[keep], self.token[keep], self.layer[keep],
                            self.experts[keep], self.num_layers, self.num_experts)

    def expert_load(self) -> np.ndarray:
        """float64[L, E]: activations of each expert at each layer."""
        valid = self.experts >= 0
        flat = (self.layer[:, None] * self.num_experts + self.experts)[valid]
        return np.bincount(flat, minlength=self.num_layers * self.num_experts).reshape(
            self.num_layers, self.num_experts).astype(np.float64)

    def occurrences(self) -> tuple[np.ndarray, np.ndarray]:
        """Token occurrences (distinct (seq, pos)), ordered by sequence then position:
        (occurrence of each event int64[N], sequence of each occurrence int64[P])."""
        stride = int(self.pos.max()) + 1 if self.num_events else 1
        keys, of_event = np.unique(self.seq * stride + self.pos, return_inverse=True)
        return of_event.reshape(-1), keys // stride

    def paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One row per token occurrence across its layers: (seq int64[P], tokens int64[P],
        experts int64[P, L, K]); -1 where the token is null, and for a layer the occurrence has no
        event for. Should two events share (seq, pos, layer), the later one is kept."""
        of_event, seq = self.occurrences()
        tokens = np.full(len(seq), -1, dtype=np.int64)
        np.maximum.at(tokens, of_event, self.token)
        experts = np.full((len(seq), self.num_layers, self.top_k), -1, dtype=np.int64)
        experts[of_event, self.layer] = self.experts
        return seq, tokens, experts


class _Columns:
    """Typed arrays that grow by one event at a time, and the checks every event passes."""

    def __init__(self, num_experts: int | None):
        if num_experts is not None and num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.seq_index: dict[str | int, int] = {}
        self.seq, self.pos, self.token, self.layer = array("q"), array("q"), array("q"), array("q")
        self.flat, self.counts = array("q"), array("q")
        self.max_expert, self.max_layer = -1, -1

    @property
    def count(self) -> int:
        return len(self.seq)

    def add(self, seq, pos, token, layer, experts) -> None:
        """Raises TraceFormatError saying what is wrong with the event."""
        if type(seq) not in (str, int):
            raise TraceFormatError(f"'seq' must be a string or an integer, got {seq!r}")
        for name, value in (("pos", pos), ("layer", layer)):
            if type(value) is not int or value < 0:
                raise TraceFormatError(f"{name!r} must be an integer >= 0, got {value!r}")
        if token is not None and (type(token) is not int or token < 0):
            raise TraceFormatError(f"'token' must be an integer >= 0 or null, got {token!r}")
        if type(experts) is not list or not experts:
            raise TraceFormatError(f"'experts' must be a non-empty list of expert ids, got {experts!r}")
        if set(map(type, experts)) != {int} or min(experts) < 0:  # one pass in C for the common case
            bad = next(e for e in experts if type(e) is not int or e < 0)
            raise TraceFormatError(f"'experts' holds {bad!r}: expert ids are integers >= 0")
        highest = max(experts)
        if self.num_experts is not None and highest >= self.num_experts:
            raise TraceFormatError(f"expert {highest} is out of range for {self.num_experts} experts")
        if len(set(experts)) != len(experts):
            raise TraceFormatError(f"'experts' names an expert twice: {experts}")
        self.seq.append(self.seq_index.setdefault(seq, len(self.seq_index)))
        self.pos.append(pos)
        self.token.append(-1 if token is None else token)
        self.layer.append(layer)
        self.flat.extend(experts)
        self.counts.append(len(experts))
        if highest > self.max_expert:
            self.max_expert = highest
        if layer > self.max_layer:
            self.max_layer = layer

    def trace(self) -> RoutingTrace:
        counts = np.frombuffer(self.counts, dtype=np.int64)
        flat = np.frombuffer(self.flat, dtype=np.int64)
        top_k = int(counts.max())
        if np.all(counts == top_k):
            experts = flat.reshape(-1, top_k)
        else:
            experts = np.full((len(counts), top_k), -1, dtype=np.int64)
            slot = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
            experts[np.repeat(np.arange(len(counts)), counts), slot] = flat
        # The columns share the arrays' memory (no copy of a large trace); read-only, as a trace is.
        return RoutingTrace(
            seq=np.frombuffer(self.seq, dtype=np.int64), seq_names=tuple(self.seq_index),
            pos=np.frombuffer(self.pos, dtype=np.int64), token=np.frombuffer(self.token, dtype=np.int64),
            layer=np.frombuffer(self.layer, dtype=np.int64), experts=experts, num_layers=self.max_layer + 1,
            num_experts=self.num_experts if self.num_experts is not None else self.max_expert + 1)


def open_trace_file(path: str, mode: str):
    """open(), or gzip.open() for a name ending in `.gz`; text modes read and write UTF-8."""
    encoding = None if "b" in mode else "utf-8"
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, mode, encoding=encoding)


def read_trace(path: str, num_experts: int | None = None,
               progress: Callable[[int], None] | None = None) -> RoutingTrace:
    """Read a trace file. num_experts, when given, is the model's expert count (a trace need not
    use the highest expert). progress(lines read so far) is called every PROGRESS_EVERY lines.
    Raises TraceFormatError (`path:line: what is wrong`) for a line that is not a routing event,
    and OSError when the file cannot be read."""
    columns = _Columns(num_experts)
    line_number = 0
    try:
        with open_trace_file(path, "rb") as lines:
            for line_number, line in enumerate(lines, start=1):
                if progress is not None and line_number % PROGRESS_EVERY == 0:
                    progress(line_number)
                if not line.strip():
                    continue
                try:
                    event = json.loads(line.decode())  # decoding first spares json its encoding detection
                except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                    raise TraceFormatError(f"{path}:{line_number}: not JSON ({e})") from None
                if not isinstance(event, dict):
                    got = json.dumps(event)[:80]
                    raise TraceFormatError(f"{path}:{line_number}: expected a JSON object, got {got}")
                try:
                    columns.add(event["seq"], event["pos"], event.get("token"), event["layer"], event["experts"])
                except KeyError as e:
                    raise TraceFormatError(f"{path}:{line_number}: missing key {e.args[0]!r}") from None
                except TraceFormatError as e:
                    raise TraceFormatError(f"{path}:{line_number}: {e}") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise TraceFormatError(f"{path}:{line_number + 1}: not a readable gzip file ({e})") from None
    if columns.count == 0:
        raise TraceFormatError(f"{path}:{line_number}: no routing events in the file")
    return columns.trace()


def write_trace(path: str, events: Iterable[RoutingEvent]) -> int:
    """Write events one JSON object per line (gzip when the name ends in `.gz`); returns how many."""
    with open_trace_file(path, "wt") as out:
        return _write_lines(out, events)


def trace_gzip_bytes(events: Iterable[RoutingEvent]) -> bytes:
    """The trace file's gzip bytes, made in memory (the Admin API's RecordRouting answer)."""
    buffer = io.BytesIO()
    with gzip.open(buffer, "wt", encoding="utf-8") as out:
        _write_lines(out, events)
    return buffer.getvalue()


def _write_lines(out, events: Iterable[RoutingEvent]) -> int:
    written = 0
    for event in events:
        out.write(json.dumps({"seq": event.seq, "pos": event.pos, "token": event.token, "layer": event.layer,
                              "experts": list(event.experts)}, separators=(",", ":")))
        out.write("\n")
        written += 1
    return written
