"""`moefleet serve`: the whole thing on one machine — a local Ray cluster, a controller,
the replicas and the gateways — in the foreground until SIGTERM or Ctrl-C, then a clean stop:
gateways drain in-flight requests, replicas stop, Ray shuts down, no process is left behind."""

import os
import signal
import sys
import threading

from moefleet.cluster.config.serve_config import ServeConfig
from moefleet.cluster.gateway.auth import TokenAuth
from moefleet.cluster.messages import GenerateRequest
from moefleet.cluster.sampling_params import SamplingParams


def _tls(config: ServeConfig):
    if not config.tls_cert:
        return None
    with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
        return cert.read(), key.read()


class LocalDeployment:
    """Start and stop one deployment; `addresses` holds the bound (host, grpc port, http port)."""

    def __init__(self, config: ServeConfig):
        self.config = config

    def start(self) -> None:
        import ray

        from moefleet.actors.controller_host import remote_controller_class
        from moefleet.actors.gateway_host import remote_gateway_class
        from moefleet.actors.ray_runtime import RAY_NAMESPACE
        from moefleet.cluster.control.controller import CONTROLLER_NAME
        from moefleet.models.init_model import default_model_dir

        config = self.config
        model = config.model or default_model_dir("mixtral", "tiny")
        self.model_id = config.model_id or os.path.basename(os.path.normpath(model))
        self.auth = TokenAuth.from_sources(config.admin_tokens, config.admin_token_file, config.inference_tokens,
                                           config.inference_token_file)
        self.generated_token = not (config.admin_tokens or config.admin_token_file or os.environ.get("MOEFLEET_ADMIN_TOKEN"))
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # "local": a new cluster of our own, never one some other job started on this machine.
            ray.init(address=config.ray_address or "local", namespace=RAY_NAMESPACE, include_dashboard=False,
                     log_to_driver=False)
        cores = len(os.sched_getaffinity(0))
        controller_config = config.controller_config(model, self.model_id, cores)
        self.num_gateways, engine = config.gateway_count(cores), controller_config.engine
        self.engine_threads = (engine.num_threads, engine.wide_step_threads, engine.wide_step_prefill_tokens,
                               engine.wide_step_spare_only)
        self.controller = remote_controller_class().options(name=CONTROLLER_NAME).remote(controller_config)
        self.initial_replicas = config.initial_replicas(controller_config.autoscaling)
        ray.get(self.controller.start.remote(self.initial_replicas))
        gateway_class, tls = remote_gateway_class(), _tls(config)
        first = gateway_class.remote(CONTROLLER_NAME, self.model_id, self.auth, f"{config.host}:{config.grpc_port}",
                                     config.host, config.http_port, tls, self.num_gateways, config.output_transport)
        grpc_port, http_port = ray.get(first.ports_bound.remote())
        # The others bind the ports the first one got (SO_REUSEPORT), so port 0 works too.
        self.gateways = [first] + [gateway_class.remote(CONTROLLER_NAME, self.model_id, self.auth, f"{config.host}:{grpc_port}",
                                                        config.host, http_port, tls, self.num_gateways,
                                                        config.output_transport)
                                   for _ in range(self.num_gateways - 1)]
        ray.get([g.ports_bound.remote() for g in self.gateways])
        self.addresses = (config.host, grpc_port, http_port)

    def sample(self, prompt: str, max_tokens: int = 24) -> str:
        """Text one replica generates for `prompt` (greedy): shows at start-up that the model serves."""
        import ray

        _, actor, _ = ray.get(self.controller.replicas.remote())[0]
        request = GenerateRequest(prompt=prompt, sampling_params=SamplingParams(temperature=0, max_tokens=max_tokens))
        return ray.get(actor.generate.remote(request), timeout=120).text_delta

    def stop(self) -> None:
        import ray

        grace = self.config.drain_grace_s
        try:
            ray.get([g.drain.remote(grace) for g in self.gateways], timeout=grace + 30)
        except Exception as e:  # keep stopping whatever else runs
            print(f"moefleet: gateway drain: {e}", file=sys.stderr)
        try:
            ray.get(self.controller.shutdown.remote(), timeout=60)
        except Exception as e:
            print(f"moefleet: replica shutdown: {e}", file=sys.stderr)
        for actor in [*self.gateways, self.controller]:
            ray.kill(actor)
        if self.started_ray:
            ray.shutdown()


def run_serve(config: ServeConfig) -> int:
    deployment = LocalDeployment(config)
    print("moefleet: starting (local Ray, controller, replicas, gateways)...", file=sys.stderr, flush=True)
    deployment.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    host, grpc_port, http_port = deployment.addresses
    scheme = "https" if config.tls_cert else "http"
    threads, wide, wide_tokens, spare_only = deployment.engine_threads
    spare = " on cores left spare" if spare_only else ""
    widened = f" ({wide} in steps prefilling {wide_tokens}+ tokens{spare})" if wide != threads else ""
    print(f"moefleet: serving model {deployment.model_id!r} with {deployment.initial_replicas} replica(s) of "
          f"{threads} torch thread(s){widened} and {deployment.num_gateways} gateway(s) (for "
          f"{len(os.sched_getaffinity(0))} cores; --replicas, --gateways and engine.num_threads, "
          f"engine.wide_step_threads override)\n"
          f"  gRPC:  {host}:{grpc_port}   (moefleet generate --address {host}:{grpc_port} \"Hello\")\n"
          f"  HTTP:  {scheme}://{host}:{http_port}/v1   (OpenAI-compatible; /health, /metrics)", flush=True)
    if deployment.generated_token:
        print(f"  admin token (generated for this run): {deployment.auth.admin_tokens[0]}", flush=True)
    if config.autoscaling_policy:
        print(f"  autoscaling by {config.autoscaling_policy} (moefleet admin autoscaler status|history)", flush=True)
    prompt = "Once upon a time"
    if deployment.initial_replicas:
        print(f"  sample: {prompt!r} -> {deployment.sample(prompt)!r}", flush=True)
    else:
        print("  scaled to zero: the first request waits while a replica starts", flush=True)
    print("Press Ctrl-C (or send SIGTERM) to drain and stop.", flush=True)
    stop.wait()
    print("moefleet: draining in-flight requests and stopping...", file=sys.stderr, flush=True)
    deployment.stop()
    print("moefleet: stopped.", file=sys.stderr, flush=True)
    return 0
