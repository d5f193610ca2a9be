"""The control plane: the controller (placement epochs, membership, recovery), its seams to the
shards and replicas, and the state store."""
