"""Autoscaling policy, its config schema and actuators. Nothing here yet: the autoscaler has its own issue."""
