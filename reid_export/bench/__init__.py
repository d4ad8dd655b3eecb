"""Latency and throughput benchmark: subjects, the alternating timing loop, statistics, reports."""

from .core import BenchSettings, CpuTimer, CudaEventTimer, Subject, run_benchmark, split_iterations
from .stats import percentile, summarize

__all__ = ["BenchSettings", "CpuTimer", "CudaEventTimer", "Subject", "run_benchmark", "split_iterations",
           "percentile", "summarize"]
