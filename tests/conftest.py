"""Shared fixtures: tiny checkpoints generated once (cached under MOEFLEET_CACHE), engines and
transformers reference models built once per session."""

import os

import pytest
import torch

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]

# Two cores: one torch thread per process keeps tests steady when other work runs beside them.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build (or load) the CPU kernels once, before any test: on a fresh machine the build takes
    ~15 s, which must not land inside a test that times a request."""
    from moefleet.kernels.cpu_extension import cpu_ops

    cpu_ops()


@pytest.fixture(scope="session")
def model_dir():
    from moefleet.models.init_model import default_model_dir

    cache: dict[str, str] = {}

    def get(arch: str, size: str = "tiny") -> str:
        if (arch, size) not in cache:
            cache[(arch, size)] = default_model_dir(arch, size)
        return cache[(arch, size)]

    return get


@pytest.fixture(scope="session")
def engines(model_dir):
    """engines(arch, **options) -> an LLM, built once per distinct option set."""
    from moefleet import LLM

    cache = {}

    def get(arch: str, **options):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in cache:
            options.setdefault("kv_cache_blocks", 512)
            options.setdefault("num_threads", 1)
            cache[key] = LLM(model_dir(arch), **options)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(model_dir(arch), dtype=torch.float32).eval()
        return cache[arch]

    return get


def random_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def shard_with_layer(shard_id: int, num_experts: int, layer: int, experts: tuple[int, ...], w13, w2,
                     epoch: int = 0):
    """An ExpertShard holding `experts` of one layer (w13 [S, 2I, D], w2 [S, D, I]) mapped in `epoch`."""
    from moefleet.cluster.experts.expert_shard import ExpertShard

    shard = ExpertShard(shard_id, num_experts)
    for i, e in enumerate(experts):
        shard.put_expert(layer, e, w13[i], w2[i])
    shard.install_epoch(epoch, {layer: tuple(experts)})
    return shard


async def collect_tokens(replica, prompt_token_ids: list[int], params) -> list[int]:
    """All tokens a Replica streams for one request (`params`: its SamplingParams)."""
    from moefleet.cluster.messages import GenerateRequest

    tokens = []
    request = GenerateRequest(prompt_token_ids=prompt_token_ids, sampling_params=params)
    async for delta in replica.generate_stream(request):
        tokens += delta.token_ids
    return tokens


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
