"""Benchmark commands: each measures one part against its peers in the same run."""
