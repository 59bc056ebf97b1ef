"""GPU tests: the real NVML path. They run where an NVIDIA driver answers and are skipped (never faked) elsewhere."""
