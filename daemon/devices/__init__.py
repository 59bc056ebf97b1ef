"""Devices: the probes that read each pool (NVML, host RAM, simulated GPUs), the budget arithmetic
over a reading and the leases, what an engine uses, and the last hour of readings."""
