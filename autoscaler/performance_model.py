"""The performance profile of one deployment, which the simulator replays traces against: how long an engine
step takes for the tokens it runs and the context they attend to, how long the expert shards take for the
token rows they get, and how long a replica and a shard take to start, cold and from standby. Tables are
measured points (`moefleet profile`) read with linear interpolation, extrapolated along the last segment.
JSON on disk, validated by pydantic (errors name the file and the key path).

DEFAULT_PROFILE holds PLACEHOLDER numbers, not measurements: round values of a plausible shape, there so the
simulator runs before anything is profiled. Run `moefleet profile --model PATH --out PROFILE.json` on the
deployment's hardware and pass `--profile PROFILE.json` for numbers that mean something."""

import json
from bisect import bisect_right
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moefleet.cluster.config.validation_errors import read_text, validated

PLACEHOLDER = "placeholder"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _ascending(values: list, name: str) -> None:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly ascending, got {values}")


def _curve(name: str, points: list[int], seconds: list[float], zero_allowed: bool) -> None:
    """A curve's points ascending and >= 1, and `seconds` one value per point, each > 0 (>= 0 if zero_allowed)."""
    _ascending(points, name)
    if min(points) < 1:
        raise ValueError(f"{name} must be >= 1, got {points}")
    low = any(s < 0 for s in seconds) if zero_allowed else any(s <= 0 for s in seconds)
    if len(seconds) != len(points) or low:
        raise ValueError(f"seconds must be {len(points)} values {'>=' if zero_allowed else '>'} 0, got {seconds}")


def _grid(row_name: str, rows: list[int], column_name: str, columns: list[int], seconds: list[list[float]]) -> None:
    """A table's axes ascending and >= 1, and `seconds` one row per rows value of one value per columns value."""
    _ascending(rows, row_name)
    _ascending(columns, column_name)
    if min(rows) < 1 or min(columns) < 1:
        raise ValueError(f"{row_name} and {column_name} must be >= 1, got {rows} and {columns}")
    if len(seconds) != len(rows) or any(len(row) != len(columns) for row in seconds):
        raise ValueError(f"seconds must be {len(rows)} rows of {len(columns)} values, got "
                         f"{[len(row) for row in seconds]}")


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """ys at x, linear between points and along the first / last segment outside them (one point: flat)."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return ys[i] + slope * (x - xs[i])


def bilinear(x: float, y: float, xs: list[float], ys: list[float], table: list[list[float]]) -> float:
    """table[i][j] (at xs[i], ys[j]) at (x, y): linear along y in the two rows around x, then along x; outside
    the points, along the edge segments (`interpolate`)."""
    if len(xs) == 1:
        return interpolate(y, ys, table[0])
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    low, high = (interpolate(y, ys, table[row]) for row in (i, i + 1))
    return interpolate(x, xs[i:i + 2], [low, high])


class StepTable(_Section):
    """Seconds of one engine step of a replica (its experts in process) by tokens in the step (decodes plus
    prefill chunks) and mean context length of its sequences: seconds[i][j] for tokens[i], context[j]."""

    tokens: list[int] = Field(min_length=1, description="Tokens per step, ascending, each >= 1.")
    context: list[int] = Field(min_length=1, description="Mean context length (tokens), ascending, each >= 1.")
    seconds: list[list[float]] = Field(description="Step time in seconds, one row per tokens value, one column "
                                                   "per context value.")

    @model_validator(mode="after")
    def _shape(self):
        _grid("tokens", self.tokens, "context", self.context, self.seconds)
        if any(s <= 0 for row in self.seconds for s in row):
            raise ValueError("seconds must all be > 0")
        return self

    def time(self, tokens: float, context: float) -> float:
        """Seconds for a step of `tokens` with mean `context`: bilinear inside the table, along the edge
        segments outside; never below the fastest measured step's tenth (a step has a fixed cost)."""
        return max(self._floor, bilinear(tokens, context, self.tokens, self.context, self.seconds))

    @cached_property
    def _floor(self) -> float:
        return 0.1 * min(min(row) for row in self.seconds)


class ShardTable(_Section):
    """Seconds the expert shards take, summed over the MoE layers of one step, for the token rows one shard gets
    (a token's row per chosen expert)."""

    rows: list[int] = Field(min_length=1, description="Token rows per shard per step, ascending, each >= 1.")
    seconds: list[float] = Field(description="Expert compute per step, seconds, one per rows value.")

    @model_validator(mode="after")
    def _shape(self):
        _curve("rows", self.rows, self.seconds, zero_allowed=False)
        return self

    def time(self, rows: float) -> float:
        if rows <= 0:
            return 0.0
        return max(0.1 * min(self.seconds), interpolate(rows, self.rows, self.seconds))


class RemoteTable(_Section):
    """Seconds one step of a replica takes in the deployment beyond the modelled step (its dense part plus the
    hottest shard's compute, scaled by compute_scale), by the expert shards serving and the tokens in the step:
    sending rows and gathering results, the output path, and the deployment's other processes on the same cores.
    seconds[i][j] for shards[i], tokens[j]."""

    shards: list[int] = Field(min_length=1, description="Expert shards serving, ascending, each >= 1.")
    tokens: list[int] = Field(min_length=1, description="Tokens per step (concurrent streams), ascending, each >= 1.")
    seconds: list[list[float]] = Field(description="Seconds beyond the modelled step, one row per shards value, "
                                                   "one column per tokens value, each >= 0.")
    compute_scale: list[float] | None = Field(
        None, description="At each shards value, how much longer the shards report computing than the shard "
                          "table says for the same rows (more shards on shared cores: longer); null: the "
                          "profile's shard_compute_scale at every count.")

    @model_validator(mode="after")
    def _shape(self):
        _grid("shards", self.shards, "tokens", self.tokens, self.seconds)
        if any(s < 0 for row in self.seconds for s in row):
            raise ValueError("seconds must all be >= 0")
        if self.compute_scale is not None and (len(self.compute_scale) != len(self.shards)
                                               or min(self.compute_scale) <= 0):
            raise ValueError(f"compute_scale must be {len(self.shards)} values > 0, got {self.compute_scale}")
        return self

    def time(self, shards: float, tokens: float) -> float:
        """Bilinear in (shards, tokens), never below 0. Beyond the measured shard counts along the edge
        segments (each shard process more costs more); tokens are held within the measured range: the cost is
        per round trip and per stream, and a long prefill step is not many streams."""
        tokens = min(max(tokens, self.tokens[0]), self.tokens[-1])
        return max(0.0, bilinear(shards, tokens, self.shards, self.tokens, self.seconds))


class RequestOverheadTable(_Section):
    """What a first token takes through the serving path beyond the engine (API, gateway, output path, the
    client's own share of the cores) by the requests in flight: more streams, more for them to work through."""

    requests: list[int] = Field(min_length=1, description="Requests in flight, ascending, each >= 1.")
    seconds: list[float] = Field(description="Seconds added to a first token, one per requests value, each >= 0.")

    @model_validator(mode="after")
    def _shape(self):
        _curve("requests", self.requests, self.seconds, zero_allowed=True)
        return self

    def time(self, requests: float) -> float:
        """Linear between the measured counts, held at the ends (no trend is guessed beyond what was measured)."""
        requests = min(max(requests, self.requests[0]), self.requests[-1])
        return max(0.0, interpolate(requests, self.requests, self.seconds))


class StartTimes(_Section):
    cold_s: float = Field(ge=0, description="Seconds from asking for a unit to its serving, from nothing.")
    standby_s: float = Field(ge=0, description="Seconds from asking to serving for a unit kept warm in standby.")
    cores: float = Field(0.0, ge=0, description="CPU cores a cold start keeps busy while it lasts (importing, "
                                                "loading weights): taken from serving where the cores are shared.")


class PerformanceProfile(_Section):
    """A deployment's measured (or placeholder) performance."""

    source: str = Field(description=f"'{PLACEHOLDER}', or how and where it was measured (moefleet profile writes it).")
    model: str = Field(description="The checkpoint profiled.")
    max_model_len: int = Field(gt=1, description="Longest prompt + output; longer trace requests are clipped.")
    kv_cache_tokens: int = Field(gt=0, description="Tokens one replica's KV cache holds.")
    max_num_seqs: int = Field(gt=0, description="Most sequences a replica runs at once.")
    max_num_batched_tokens: int = Field(gt=0, description="Token budget of one step (decodes + prefill chunks).")
    num_experts: int = Field(gt=0, description="Routed experts per MoE layer.")
    num_moe_layers: int = Field(gt=0, description="MoE layers.")
    top_k: int = Field(gt=0, description="Experts each token is routed to.")
    expert_bytes: int = Field(ge=0, description="Bytes of one expert's weights in one layer (what one copy moves).")
    step: StepTable = Field(description="Engine step time by tokens and context.")
    shard: ShardTable = Field(description="Expert shard compute by token rows.")
    remote_step_s: float = Field(ge=0, description="Added to each step when the experts live on shared shards "
                                                   "(sending rows and gathering results), where `remote` is null.")
    remote: RemoteTable | None = Field(None, description="The same by shards serving and tokens per step, measured "
                                                         "through the deployment; null: remote_step_s throughout.")
    shard_compute_scale: float = Field(1.0, gt=0, description="How much longer the deployment's shards report "
                                       "computing than the shard table says for the same rows (their threads, "
                                       "cores shared with other processes): scales the hottest shard's share of a "
                                       "step and the shard utilisation the simulator shows the policy.")
    request_overhead_s: float = Field(0.0, ge=0, description="Added to each request's time to first token: the "
                                      "serving path beyond the engine (API, gateway, output channel), slowed as "
                                      "a step is where the units share cores (shared_cores).")
    request_overhead: RequestOverheadTable | None = Field(
        None, description="The same by the requests in flight when the first token comes, where it was measured so "
                          "(moefleet profile --openai-url); null: request_overhead_s throughout.")
    shared_cores: float | None = Field(
        None, gt=0, description="CPU cores every unit of the deployment shares (all on one machine): replica steps "
                                "and cold starts beyond them take turns, and each step slows by demand / cores. "
                                "null: each unit has cores of its own.")
    step_spread: float = Field(0.0, ge=0, description="Spread of a step's time in the deployment: the standard "
                               "deviation of its logarithm. The simulator draws each step as the modelled time x "
                               "exp(step_spread x z), z standard normal, so the tails of TTFT and ITL come from "
                               "slow steps as they do there; 0: every step as modelled.")
    step_cores: float = Field(1.0, gt=0, description="Cores one replica's engine step keeps busy (the torch threads "
                                                     "the step table was measured with).")
    replica_start: StartTimes = Field(description="Start time of a model replica.")
    shard_start: StartTimes = Field(description="Start time of an expert shard (its experts loaded).")
    notes: dict[str, str] = Field(default_factory=dict, description="How each number was measured, by field.")

    @model_validator(mode="after")
    def _fits(self):
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold one request of max_model_len "
                             f"({self.max_model_len})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        return self

    def core_slowdown(self, busy_replicas: int, starting_cores: float) -> float:
        """How much slower a step runs with `busy_replicas` replicas stepping at once (its own included)
        and cold starts keeping `starting_cores` cores busy, when the units share `shared_cores`
        (processor sharing: each gets its share of the cores); 1 when they do not share."""
        if self.shared_cores is None:
            return 1.0
        return max(1.0, (busy_replicas * self.step_cores + starting_cores) / self.shared_cores)

    def request_overhead_time(self, in_flight: int) -> float:
        """Seconds the serving path adds to a first token with `in_flight` requests in flight (cores unshared)."""
        if self.request_overhead is None:
            return self.request_overhead_s
        return self.request_overhead.time(in_flight)

    @property
    def measured(self) -> bool:
        return self.source != PLACEHOLDER

    def compute_scale(self, shards: float) -> float:
        """How much longer the deployment's shards compute than the shard table says, at `shards` shards."""
        if self.remote is not None and self.remote.compute_scale is not None:
            return max(0.0, interpolate(shards, self.remote.shards, self.remote.compute_scale))
        return self.shard_compute_scale

    def step_time(self, tokens: int, context: float, shards: int = 0, imbalance: float = 1.0,
                  shard_slowdown: float = 1.0) -> tuple[float, float]:
        """(step seconds, seconds the mean shard reports busy) for `tokens` with mean `context`. shards 0: the
        experts in the replica's own process (the step table as measured). Otherwise the experts' share of the measured
        step is replaced by the hottest shard's: tokens × top_k rows spread over `shards`, × `imbalance`
        (max / mean shard load), × the shards' compute scale there, × `shard_slowdown` (waiting behind other
        replicas' rows), plus the remote overhead (from `remote` at this many shards and tokens where it was
        measured). The compute scale grows with the rows, as a prefill's do; the remote overhead is per round trip
        and stream, which the remote table holds to the decode batches it measured."""
        measured = self.step.time(tokens, context)
        if shards <= 0:
            return measured, 0.0
        rows, scale = tokens * self.top_k, self.compute_scale(shards)
        dense = max(0.1 * measured, measured - self.shard.time(rows))
        hottest = self.shard.time(rows * imbalance / shards) * scale
        remote = self.remote.time(shards, tokens) if self.remote is not None else self.remote_step_s
        return dense + hottest * shard_slowdown + remote, self.shard.time(rows / shards) * scale


# PLACEHOLDER numbers (not measured): a round-number profile of a mid-size MoE on one accelerator per unit,
# shaped like a decode-bound engine (fixed cost per step, a little per token, attention growing with context).
DEFAULT_PROFILE = PerformanceProfile(
    source=PLACEHOLDER,
    model="placeholder (no model was profiled)",
    max_model_len=8192,
    kv_cache_tokens=131072,
    max_num_seqs=64,
    max_num_batched_tokens=2048,
    num_experts=8,
    num_moe_layers=32,
    top_k=2,
    expert_bytes=176_160_768,
    step=StepTable(tokens=[1, 64, 256, 1024, 2048], context=[128, 2048, 8192],
                   seconds=[[0.025, 0.026, 0.028], [0.030, 0.034, 0.045], [0.038, 0.045, 0.070],
                            [0.070, 0.085, 0.150], [0.120, 0.150, 0.260]]),
    shard=ShardTable(rows=[1, 128, 1024, 4096], seconds=[0.002, 0.004, 0.012, 0.040]),
    remote_step_s=0.002,
    replica_start=StartTimes(cold_s=60.0, standby_s=5.0),
    shard_start=StartTimes(cold_s=20.0, standby_s=3.0),
    notes={"all": "placeholder values, not measured: run `moefleet profile` on the deployment's hardware"},
)


def parse_profile(text: str, source: str = "<profile>") -> PerformanceProfile:
    """A profile from JSON `text`. Raises ValueError, one line per error: `<source>: key.path: reason`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{e.lineno}: not valid JSON: {e.msg}") from None
    return validated(PerformanceProfile, data, source)


def load_profile(path: str) -> PerformanceProfile:
    return parse_profile(read_text(path), str(path))


def save_profile(profile: PerformanceProfile, path: str) -> None:
    with open(path, "w") as f:
        f.write(profile.model_dump_json(indent=2) + "\n")
