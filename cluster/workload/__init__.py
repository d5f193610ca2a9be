"""Workloads as plain data: request traces (arrival times and lengths) read from public formats."""
