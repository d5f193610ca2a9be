"""The gRPC front door: moefleet.v1.Inference and moefleet.v1.Admin on grpc.aio, with the
standard grpc.health.v1 service and server reflection. Every error leaves through the one table
in error_codes.py; a request that does not even parse (say, invalid UTF-8 in a string field) is
INVALID_ARGUMENT, not an internal error."""

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moefleet.cluster.errors import InvalidRequestError, ModelNotFoundError
from moefleet.cluster.gateway.error_codes import classify, retry_after_s
from moefleet.cluster.gateway.router import request_cost
from moefleet.cluster.messages import GenerateRequest, OutputDelta, join_deltas
from moefleet.cluster.sampling_params import SamplingParams
from moefleet.v1 import admin_pb2, inference_pb2

INFERENCE, ADMIN = "moefleet.v1.Inference", "moefleet.v1.Admin"


class _Malformed:
    def __init__(self, error: Exception):
        self.error = error


def _tolerant(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return _Malformed(e)
    return parse


def generate_request(msg: inference_pb2.GenerateRequest, model_id: str) -> GenerateRequest:
    """A GenerateRequest message as the replica's request (raises for a wrong model, no prompt, or
    a sampling option out of range, naming it)."""
    if msg.model and msg.model != model_id:
        raise ModelNotFoundError(msg.model, [model_id])
    which = msg.WhichOneof("input")
    # The options the client set, read off the message itself (SamplingOptions names its fields
    # as SamplingParams does): `optional` ones when present, repeated ones when not empty,
    # ignore_eos when true.
    options = {f.name: list(value) if f.is_repeated else value for f, value in msg.sampling.ListFields()}
    return GenerateRequest(prompt=msg.prompt if which == "prompt" else None,
                           prompt_token_ids=list(msg.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
                           sampling_params=SamplingParams(**options), request_id=msg.request_id)


def _logprobs(entries) -> list[inference_pb2.TokenLogprobs]:
    out = []
    for token, entry in entries:
        top = sorted(entry.items(), key=lambda kv: -kv[1])
        out.append(inference_pb2.TokenLogprobs(token_id=token, logprob=entry[token],
                                               top=[inference_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in top]))
    return out


def _usage(delta: OutputDelta) -> inference_pb2.Usage:
    return inference_pb2.Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                               cached_prompt_tokens=delta.cached_prompt_tokens)


def _stop_reason(delta: OutputDelta) -> str:
    return "" if delta.stop_reason is None else str(delta.stop_reason)


def _authorization(context) -> str | None:
    return dict(context.invocation_metadata()).get("authorization")


async def _abort(context, error: BaseException):
    code, _, _, message = classify(error)
    hint = retry_after_s(error)
    if hint is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(hint * 1000))),))
    await context.abort(code, message)


class InferenceService:
    def __init__(self, gateway):
        self.gateway = gateway

    async def _begin(self, request, context) -> GenerateRequest:
        if isinstance(request, _Malformed):
            raise InvalidRequestError("request", f"not a valid GenerateRequest ({request.error}); strings must be UTF-8")
        self.gateway.auth.check_inference(_authorization(context))
        self.gateway.check_accepting()
        return generate_request(request, self.gateway.model_id)

    async def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        try:
            req = await self._begin(request, context)
            whole = join_deltas([delta async for delta in self.gateway.pool.stream(req, request_cost(req))])
            return inference_pb2.GenerateResponse(
                request_id=whole.request_id, text=whole.text_delta, token_ids=whole.token_ids,
                logprobs=_logprobs(zip(whole.token_ids, whole.logprobs or [])), finish_reason=whole.finish_reason or "",
                stop_reason=_stop_reason(whole), usage=_usage(whole), model=self.gateway.model_id)
        except Exception as error:
            await _abort(context, error)

    async def GenerateStream(self, request, context):  # noqa: N802
        try:
            req = await self._begin(request, context)
            async for delta in self.gateway.pool.stream(req, request_cost(req)):
                message = inference_pb2.GenerateStreamResponse(
                    request_id=delta.request_id, token_ids=delta.token_ids, text_delta=delta.text_delta,
                    logprobs=_logprobs(zip(delta.token_ids, delta.logprobs)) if delta.logprobs is not None else [],
                    finish_reason=delta.finish_reason or "")
                if delta.finish_reason is not None:
                    message.usage.CopyFrom(_usage(delta))
                yield message
        except Exception as error:
            await _abort(context, error)

    async def Tokenize(self, request, context):  # noqa: N802
        try:
            if isinstance(request, _Malformed):
                raise InvalidRequestError("request", f"not a valid TokenizeRequest ({request.error})")
            self.gateway.auth.check_inference(_authorization(context))
            if request.model and request.model != self.gateway.model_id:
                raise ModelNotFoundError(request.model, [self.gateway.model_id])
            ids = await self.gateway.pool.any().call("tokenize", request.text)
            return inference_pb2.TokenizeResponse(token_ids=ids)
        except Exception as error:
            await _abort(context, error)

    async def ListModels(self, request, context):  # noqa: N802
        try:
            self.gateway.auth.check_inference(_authorization(context))
            info = await self.gateway.model_info()
            return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelInfo(**info)])
        except Exception as error:
            await _abort(context, error)


class AdminService:
    def __init__(self, gateway):
        self.gateway = gateway

    def __getattr__(self, name):
        operation = getattr(self.gateway.admin, name)

        async def handler(request, context):
            try:
                if isinstance(request, _Malformed):
                    raise InvalidRequestError("request", f"not a valid {name} request ({request.error})")
                self.gateway.auth.check_admin(_authorization(context))
                return await operation(request)
            except NotImplementedError as e:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
            except Exception as error:
                await _abort(context, error)
        return handler


def _handlers(service, methods: dict) -> dict:
    out = {}
    for name, (kind, req_type, resp_type) in methods.items():
        make = grpc.unary_stream_rpc_method_handler if kind == "stream" else grpc.unary_unary_rpc_method_handler
        out[name] = make(getattr(service, name), request_deserializer=_tolerant(req_type),
                         response_serializer=resp_type.SerializeToString)
    return out


def build_grpc_server(gateway, address: str, tls: tuple[bytes, bytes] | None = None,
                      reuse_port: bool = True) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server for `gateway` bound to `address` (port 0: any free port). Several
    gateway processes bind one port with SO_REUSEPORT and the kernel spreads connections."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    ip = inference_pb2
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE, _handlers(InferenceService(gateway), {
        "Generate": ("unary", ip.GenerateRequest, ip.GenerateResponse),
        "GenerateStream": ("stream", ip.GenerateRequest, ip.GenerateStreamResponse),
        "Tokenize": ("unary", ip.TokenizeRequest, ip.TokenizeResponse),
        "ListModels": ("unary", ip.ListModelsRequest, ip.ListModelsResponse),
    })),))
    a = admin_pb2
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN, _handlers(AdminService(gateway), {
        "GetClusterState": ("unary", a.GetClusterStateRequest, a.ClusterState),
        "ScaleShards": ("unary", a.ScaleShardsRequest, a.OperationResult),
        "ScaleReplicas": ("unary", a.ScaleReplicasRequest, a.OperationResult),
        "Rebalance": ("unary", a.RebalanceRequest, a.OperationResult),
        "Drain": ("unary", a.DrainRequest, a.OperationResult),
        "GetAutoscalingPolicy": ("unary", a.GetAutoscalingPolicyRequest, a.AutoscalingPolicy),
        "SetAutoscalingPolicy": ("unary", a.AutoscalingPolicy, a.OperationResult),
        "RecordRouting": ("unary", a.RecordRoutingRequest, a.RoutingTrace),
        "GetAutoscalerStatus": ("unary", a.GetAutoscalerStatusRequest, a.AutoscalerStatus),
    })),))
    gateway.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(gateway.health, server)
    reflection.enable_server_reflection((INFERENCE, ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        port = server.add_insecure_port(address)
    return server, port


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
