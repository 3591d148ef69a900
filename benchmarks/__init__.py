"""Reload benchmarks: tp-reload against the machine's floor and real peers, in one run."""
