"""Processes of a cluster as plain classes; Ray shells are applied late, where they are started."""
