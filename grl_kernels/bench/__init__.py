"""Benchmark and check toolkit behind ``grl-kernels check`` / ``bench`` / ``bench-model``.

cases (geometries and inputs), compare (error metric and tolerances), timing (time and
peak memory), counts (FLOPs and bytes), ceilings (matmul / copy peaks measured in the run),
baselines (reference, torch.compile, FlexAttention), runner and model (the benchmarks),
machine (what it ran on), progress and report (output).
"""
