"""lessor: VRAM leases, budget admission and engine supervision for LLMs sharing GPUs."""

__version__ = "0.1.0"
