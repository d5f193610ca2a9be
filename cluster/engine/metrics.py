"""Prometheus exposition of a replica's data-plane counters: tokens per expert, traffic per
shard (sends, bytes each way, compute time, local vs remote node) and per-token shard fan-out."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def render_prometheus(engine, extra_labels: dict[str, str] | None = None) -> str:
    """Text exposition format 0.0.4 of `engine`'s counters; extra_labels go on every sample
    (e.g. the replica, when a gateway concatenates several replicas' metrics)."""
    lines: list[str] = []
    extra = "".join(f',{k}="{v}"' for k, v in (extra_labels or {}).items())

    def _family(lines, name, kind, help_text, samples):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{labels}{extra}}} {value}" for labels, value in samples]

    load, traffic, dispatcher = engine.load, engine.experts.transport.traffic, engine.dispatcher
    moe_layers = engine.spec.moe_layer_indices
    _family(lines, "moefleet_expert_tokens_total", "counter", "Tokens routed to each expert.",
            [(f'layer="{layer}",expert="{e}"', int(n)) for row, layer in enumerate(moe_layers)
             for e, n in enumerate(load.total[row].tolist())])
    where = lambda s: "local" if traffic.local[s] else "remote"  # noqa: E731
    shards = range(len(traffic.sends))
    _family(lines, "moefleet_shard_sends_total", "counter", "Round trips to each expert shard.",
            [(f'shard="{s}",locality="{where(s)}"', traffic.sends[s]) for s in shards])
    _family(lines, "moefleet_shard_bytes_sent_total", "counter", "Bytes sent to each shard (activations and routing).",
            [(f'shard="{s}",locality="{where(s)}"', traffic.bytes_out[s]) for s in shards])
    _family(lines, "moefleet_shard_bytes_received_total", "counter", "Bytes of partial sums received from each shard.",
            [(f'shard="{s}",locality="{where(s)}"', traffic.bytes_in[s]) for s in shards])
    _family(lines, "moefleet_shard_compute_seconds_total", "counter", "Expert compute time inside each shard.",
            [(f'shard="{s}"', round(traffic.compute_s[s], 6)) for s in shards])
    name = "moefleet_token_shard_fanout"
    lines += [f"# HELP {name} Distinct shards a token's experts lay on, per MoE layer visit.", f"# TYPE {name} histogram"]
    cumulative = 0
    for n in range(1, dispatcher.num_shards + 1):
        cumulative += dispatcher.fanout[n]
        lines.append(f'{name}_bucket{{le="{n}"{extra}}} {cumulative}')
    lines.append(f'{name}_bucket{{le="+Inf"{extra}}} {cumulative}')
    bare = f"{{{extra[1:]}}}" if extra else ""
    lines.append(f"{name}_sum{bare} {sum(n * c for n, c in enumerate(dispatcher.fanout))}")
    lines.append(f"{name}_count{bare} {cumulative}")
    return "\n".join(lines) + "\n"


def start_metrics_server(engine, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve GET /metrics in a daemon thread; returns the server (its port: server.server_port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = render_prometheus(engine).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep scrapes out of the logs
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="moefleet-metrics", daemon=True).start()
    return server
