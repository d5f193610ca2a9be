"""Placement: the types (which shard slots hold which experts, per epoch) and the pure planners
over them (plan, diff, repair, staging plan). Imports only numpy and the standard library."""
