"""The daemon: devices and probes, ledger, budget, memory model and planner, supervisor, events, config."""
