"""Autoscaling policies: pure functions of metrics to decisions, with their config schemas."""
