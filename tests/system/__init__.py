"""System tests: a real lessord process (and what it starts), driven over its HTTP APIs, its CLI, signals and systemd's protocols."""
