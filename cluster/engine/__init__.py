"""The engine loop of one replica (nano-vllm's shape): scheduler, block manager, sequences,
sampler, model runner, async driver. Imports no ray, redis or grpc."""
