"""The expert data plane: the dispatcher, the transports to shards (in process, Ray actor
calls, compiled graphs), the shard wire format, the in-process ExpertShard and expert backends."""
