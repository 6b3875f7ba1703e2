"""Real processes and servers that the tests and the benchmarks start (not shipped in the wheel):
free ports, child processes found and stopped by PID, the environment a child needs, and moto's
standalone S3 server. Tests add their own helpers in ``tests/helpers/``; benchmarks import only
from here and from ``benchmarks/``."""
