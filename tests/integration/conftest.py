"""A real gateway (gRPC + HTTP on port 0) in front of a real in-process replica."""

import pytest

ADMIN_TOKEN = "admin-secret"


@pytest.fixture(scope="session")
def replica(model_dir):
    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig

    r = Replica("replica-0", EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=512, num_threads=1), max_waiting=256,
                model_id="mixtral-tiny")
    yield r
    r.shutdown()


def start_gateway(handles, **options):
    from moefleet.cluster.gateway.auth import TokenAuth
    from moefleet.cluster.gateway.gateway import Gateway

    auth = options.pop("auth", TokenAuth((ADMIN_TOKEN,), ()))
    gateway = Gateway(handles, "mixtral-tiny", auth, **options)
    grpc_port, http_port = gateway.start()
    return gateway, grpc_port, http_port


@pytest.fixture(scope="session")
def gateway(replica):
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle

    gw, grpc_port, http_port = start_gateway([LocalReplicaHandle(replica)])
    gw.grpc_port, gw.http_port = grpc_port, http_port
    yield gw
    gw.stop(grace_s=2)


@pytest.fixture
def client(gateway):
    from moefleet.client import Client

    with Client(f"127.0.0.1:{gateway.grpc_port}", timeout=120) as c:
        yield c


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
