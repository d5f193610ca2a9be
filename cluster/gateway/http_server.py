"""The OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions (SSE
streaming), /v1/models, /health, /metrics. Errors in OpenAI's shape, statuses from the one
error table."""

import dataclasses
import json
import time
import uuid

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from moefleet.cluster.errors import InvalidRequestError, ModelNotFoundError
from moefleet.cluster.gateway.error_codes import classify, retry_after_s
from moefleet.cluster.gateway.router import request_cost
from moefleet.cluster.messages import GenerateRequest, join_deltas
from moefleet.cluster.sampling_params import SamplingParams

# SamplingParams' options that a body carries under their own names (as vLLM's OpenAI server
# takes them); max_tokens and logprobs mean other things in OpenAI's API and are mapped below.
_SAME_NAMED = tuple(f.name for f in dataclasses.fields(SamplingParams)
                    if f.init and f.name not in ("max_tokens", "logprobs"))


def error_response(error: BaseException) -> web.Response:
    _, status, kind, message = classify(error)
    param = getattr(error, "field", None)
    headers = {}
    hint = retry_after_s(error)
    if hint is not None:
        headers["Retry-After"] = str(max(1, round(hint)))
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status, headers=headers)


def _sampling_params(body: dict, chat: bool) -> SamplingParams:
    """A body's sampling options (a null one takes the default); a bad value raises naming it."""
    options = {name: body[name] for name in _SAME_NAMED if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = max_tokens if max_tokens is not None else body.get("max_tokens")
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    if chat:  # logprobs: a flag, with top_logprobs as the k
        if body.get("logprobs"):
            options["logprobs"] = int(body.get("top_logprobs") or 0)
    elif body.get("logprobs") is not None:
        options["logprobs"] = body["logprobs"]
    return SamplingParams(**options)


def _include_usage(body: dict) -> bool:
    """OpenAI's `stream_options: {"include_usage": bool}`, allowed only with `stream: true`."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise InvalidRequestError("stream_options", "is only allowed with stream: true")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequestError("stream_options", 'must be an object like {"include_usage": true}')
    return options.get("include_usage", False)


def _usage(delta) -> dict:
    """OpenAI's usage object from a request's last delta."""
    return {"prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens,
            "total_tokens": delta.prompt_tokens + delta.completion_tokens}


class HttpApi:
    def __init__(self, gateway):
        self.gateway = gateway

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own 404/405: keep OpenAI's shape
            return web.json_response({"error": {"message": e.reason, "type": "invalid_request_error", "param": None,
                                                "code": e.status}}, status=e.status)
        except Exception as error:
            return error_response(error)

    async def _body(self, request: web.Request) -> dict:
        self.gateway.auth.check_inference(request.headers.get("Authorization"))
        self.gateway.check_accepting()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError("body", f"not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("body", "must be a JSON object")
        model = body.get("model")
        if model and model != self.gateway.model_id:
            raise ModelNotFoundError(model, [self.gateway.model_id])
        return body

    async def completions(self, request: web.Request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            given = {"prompt": prompt}
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            given = {"prompt_token_ids": prompt}
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids (one prompt per request)")
        req = GenerateRequest(**given, sampling_params=_sampling_params(body, chat=False))
        return await self._run(request, req, body, chat=False)

    async def chat_completions(self, request: web.Request):
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise InvalidRequestError("messages", "must be a list of {role, content}")
        ids = await self.gateway.pool.any().call("apply_chat_template", messages)
        req = GenerateRequest(prompt_token_ids=ids, sampling_params=_sampling_params(body, chat=True))
        return await self._run(request, req, body, chat=True)

    async def _run(self, http_request, req: GenerateRequest, body: dict, chat: bool):
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        model = self.gateway.model_id
        include_usage = _include_usage(body)
        deltas = self.gateway.pool.stream(req, request_cost(req))
        if not body.get("stream"):
            whole = join_deltas([delta async for delta in deltas])
            logprobs = list(zip(whole.token_ids, whole.logprobs or []))
            usage = _usage(whole)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": whole.text_delta},
                          "finish_reason": whole.finish_reason,
                          "logprobs": self._chat_logprobs(logprobs) if logprobs else None}
                return web.json_response({"id": rid, "object": "chat.completion", "created": created, "model": model,
                                          "choices": [choice], "usage": usage})
            choice = {"index": 0, "text": whole.text_delta, "finish_reason": whole.finish_reason,
                      "logprobs": self._completion_logprobs(logprobs) if logprobs else None}
            return web.json_response({"id": rid, "object": "text_completion", "created": created, "model": model,
                                      "choices": [choice], "usage": usage})
        # Server-sent events. Errors before the first event are plain HTTP errors (raised above
        # by the first delta); after it they arrive as an error event.
        first = await anext(deltas)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http_request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            await self._event(response, {"id": rid, "object": kind, "created": created, "model": model,
                                         "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        try:
            delta = first
            while True:
                choice = ({"index": 0, "delta": {"content": delta.text_delta} if delta.text_delta else {},
                           "finish_reason": delta.finish_reason} if chat else
                          {"index": 0, "text": delta.text_delta, "finish_reason": delta.finish_reason})
                await self._event(response, {"id": rid, "object": kind, "created": created, "model": model,
                                             "choices": [choice], **({"usage": None} if include_usage else {})})
                if delta.finish_reason is not None:
                    break
                delta = await anext(deltas)
            if include_usage:  # OpenAI's stream_options.include_usage: a last chunk with the usage and no choices
                await self._event(response, {"id": rid, "object": kind, "created": created, "model": model,
                                             "choices": [], "usage": _usage(delta)})
        except Exception as error:
            _, status, error_type, message = classify(error)
            await self._event(response, {"error": {"message": message, "type": error_type, "code": status}})
        finally:
            await deltas.aclose()
        await response.write(b"data: [DONE]\n\n")
        return response

    @staticmethod
    async def _event(response, payload: dict) -> None:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    @staticmethod
    def _completion_logprobs(entries) -> dict:
        return {"tokens": [str(t) for t, _ in entries], "token_logprobs": [e[t] for t, e in entries],
                "top_logprobs": [{str(k): v for k, v in e.items()} for _, e in entries]}

    @staticmethod
    def _chat_logprobs(entries) -> dict:
        return {"content": [{"token": str(t), "logprob": e[t], "bytes": None,
                             "top_logprobs": [{"token": str(k), "logprob": v, "bytes": None} for k, v in e.items()]}
                            for t, e in entries]}

    async def models(self, request: web.Request):
        self.gateway.auth.check_inference(request.headers.get("Authorization"))
        info = await self.gateway.model_info()
        return web.json_response({"object": "list", "data": [
            {"id": info["id"], "object": "model", "created": 0, "owned_by": "moefleet",
             "max_model_len": info["max_model_len"]}]})

    async def health(self, request: web.Request):
        if self.gateway.draining:
            return web.json_response({"status": "draining"}, status=503)
        body = {"status": "ok", "replicas": len(self.gateway.pool.handles)}
        control = await self.gateway.control_health()
        if control is not None:  # serving goes on without the control plane; this says how it stands
            body["control"] = control
        return web.json_response(body)

    async def metrics(self, request: web.Request):
        return web.Response(text=await self.gateway.metrics_text(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
