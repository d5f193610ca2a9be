from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardState(_message.Message):
    __slots__ = ("shard", "node_id", "weight_bytes", "transport", "compute_seconds")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    node_id: str
    weight_bytes: int
    transport: str
    compute_seconds: float
    def __init__(self, shard: _Optional[int] = ..., node_id: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., transport: _Optional[str] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("replica_id", "status", "running", "waiting", "outstanding_tokens", "shards", "expert_load")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    status: str
    running: int
    waiting: int
    outstanding_tokens: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardState]
    expert_load: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    def __init__(self, replica_id: _Optional[str] = ..., status: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., outstanding_tokens: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardState, _Mapping]]] = ..., expert_load: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ...) -> None: ...

class ClusterState(_message.Message):
    __slots__ = ("model", "placement_epoch", "replicas", "gateways")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    placement_epoch: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaState]
    gateways: int
    def __init__(self, model: _Optional[str] = ..., placement_epoch: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaState, _Mapping]]] = ..., gateways: _Optional[int] = ...) -> None: ...

class ScaleShardsRequest(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: int
    def __init__(self, shards: _Optional[int] = ...) -> None: ...

class ScaleReplicasRequest(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: int
    def __init__(self, replicas: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("replica_id",)
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    def __init__(self, replica_id: _Optional[str] = ...) -> None: ...

class OperationResult(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class GetAutoscalingPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AutoscalingPolicy(_message.Message):
    __slots__ = ("yaml",)
    YAML_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    def __init__(self, yaml: _Optional[str] = ...) -> None: ...

class RecordRoutingRequest(_message.Message):
    __slots__ = ("sample_rate", "duration_s", "max_events")
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    sample_rate: float
    duration_s: float
    max_events: int
    def __init__(self, sample_rate: _Optional[float] = ..., duration_s: _Optional[float] = ..., max_events: _Optional[int] = ...) -> None: ...

class RoutingTrace(_message.Message):
    __slots__ = ("jsonl_gz", "events", "truncated")
    JSONL_GZ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    jsonl_gz: bytes
    events: int
    truncated: bool
    def __init__(self, jsonl_gz: _Optional[bytes] = ..., events: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class GetAutoscalerStatusRequest(_message.Message):
    __slots__ = ("history", "limit")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    history: bool
    limit: int
    def __init__(self, history: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class AutoscalerStatus(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
