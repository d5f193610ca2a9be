"""Python client of a moefleet gateway over gRPC: `Client` (blocking) and `AsyncClient`
(asyncio), both with streaming. Errors arrive as grpc.RpcError with the server's status code."""

from collections.abc import AsyncIterator, Iterator

import grpc

from moefleet.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

_SAMPLING_FIELDS = inference_pb2.SamplingOptions.DESCRIPTOR.fields_by_name


def build_request(prompt: str | list[int], model: str = "", request_id: str = "", **sampling) -> inference_pb2.GenerateRequest:
    """prompt: text or token ids; sampling: fields of moefleet.v1.SamplingOptions by name (see
    proto/moefleet/v1/inference.proto); None leaves one unset, so the server's default applies."""
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling options: {sorted(unknown)}")
    # One stop string is a list of one, not of its characters.
    options = {name: [value] if _SAMPLING_FIELDS[name].is_repeated and isinstance(value, str) else value
               for name, value in sampling.items() if value is not None}
    request = inference_pb2.GenerateRequest(model=model, request_id=request_id,
                                            sampling=inference_pb2.SamplingOptions(**options))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


MAX_REPLY_BYTES = 64 << 20  # a recorded routing trace can pass gRPC's default 4 MB


def _channel_args(address: str, tls_ca: bytes | None):
    if tls_ca is not None:
        return address, grpc.ssl_channel_credentials(root_certificates=tls_ca)
    return address, None


class Client:
    """Client("host:port", token=None, tls_ca=None). Use as a context manager or call close()."""

    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None, timeout: float | None = None):
        address, credentials = _channel_args(address, tls_ca)
        options = [("grpc.max_receive_message_length", MAX_REPLY_BYTES)]
        self.channel = (grpc.secure_channel(address, credentials, options) if credentials
                        else grpc.insecure_channel(address, options))
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin_stub = admin_pb2_grpc.AdminStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def generate(self, prompt, **options) -> inference_pb2.GenerateResponse:
        timeout = options.pop("timeout", self.timeout)
        return self.inference.Generate(build_request(prompt, **options), metadata=self.metadata, timeout=timeout)

    def generate_stream(self, prompt, **options) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """Iterate the stream; call .cancel() on the returned iterator to stop early."""
        timeout = options.pop("timeout", self.timeout)
        return self.inference.GenerateStream(build_request(prompt, **options), metadata=self.metadata, timeout=timeout)

    def tokenize(self, text: str, model: str = "") -> list[int]:
        return list(self.inference.Tokenize(inference_pb2.TokenizeRequest(model=model, text=text),
                                            metadata=self.metadata, timeout=self.timeout).token_ids)

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        return list(self.inference.ListModels(inference_pb2.ListModelsRequest(), metadata=self.metadata,
                                              timeout=self.timeout).models)

    def cluster_state(self) -> admin_pb2.ClusterState:
        return self.admin_stub.GetClusterState(admin_pb2.GetClusterStateRequest(), metadata=self.metadata, timeout=self.timeout)

    def scale_shards(self, shards: int) -> admin_pb2.OperationResult:
        return self.admin_stub.ScaleShards(admin_pb2.ScaleShardsRequest(shards=shards), metadata=self.metadata, timeout=self.timeout)

    def scale_replicas(self, replicas: int) -> admin_pb2.OperationResult:
        return self.admin_stub.ScaleReplicas(admin_pb2.ScaleReplicasRequest(replicas=replicas), metadata=self.metadata,
                                             timeout=self.timeout)

    def rebalance(self) -> admin_pb2.OperationResult:
        return self.admin_stub.Rebalance(admin_pb2.RebalanceRequest(), metadata=self.metadata, timeout=self.timeout)

    def drain(self, replica_id: str) -> admin_pb2.OperationResult:
        return self.admin_stub.Drain(admin_pb2.DrainRequest(replica_id=replica_id), metadata=self.metadata, timeout=self.timeout)

    def get_autoscaling_policy(self) -> str:
        """The autoscaling policy in force, as YAML."""
        return self.admin_stub.GetAutoscalingPolicy(admin_pb2.GetAutoscalingPolicyRequest(), metadata=self.metadata,
                                                    timeout=self.timeout).yaml

    def set_autoscaling_policy(self, yaml_text: str) -> admin_pb2.OperationResult:
        """Validate, hot-reload and persist a policy (INVALID_ARGUMENT names each bad key)."""
        return self.admin_stub.SetAutoscalingPolicy(admin_pb2.AutoscalingPolicy(yaml=yaml_text),
                                                    metadata=self.metadata, timeout=self.timeout)

    def autoscaler_status(self, history: bool = False, limit: int = 0):
        """The autoscaler's status (a dict), or its decision history (a list, newest first)."""
        import json

        reply = self.admin_stub.GetAutoscalerStatus(admin_pb2.GetAutoscalerStatusRequest(history=history, limit=limit),
                                                    metadata=self.metadata, timeout=self.timeout)
        return json.loads(reply.json)

    def record_routing(self, sample_rate: float, duration_s: float, max_events: int = 0) -> admin_pb2.RoutingTrace:
        """The deployment's routing for `duration_s` (a routing trace, gzip'd JSONL, in the reply)."""
        request = admin_pb2.RecordRoutingRequest(sample_rate=sample_rate, duration_s=duration_s, max_events=max_events)
        return self.admin_stub.RecordRouting(request, metadata=self.metadata, timeout=duration_s + 60)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """The asyncio twin of Client."""

    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None, timeout: float | None = None):
        address, credentials = _channel_args(address, tls_ca)
        self.channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    async def generate(self, prompt, **options) -> inference_pb2.GenerateResponse:
        timeout = options.pop("timeout", self.timeout)
        return await self.inference.Generate(build_request(prompt, **options), metadata=self.metadata, timeout=timeout)

    async def generate_stream(self, prompt, **options) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        timeout = options.pop("timeout", self.timeout)
        call = self.inference.GenerateStream(build_request(prompt, **options), metadata=self.metadata, timeout=timeout)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def tokenize(self, text: str, model: str = "") -> list[int]:
        reply = await self.inference.Tokenize(inference_pb2.TokenizeRequest(model=model, text=text), metadata=self.metadata,
                                              timeout=self.timeout)
        return list(reply.token_ids)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
