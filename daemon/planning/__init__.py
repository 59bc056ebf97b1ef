"""Planning, pure (no SQL, no HTTP, no I/O): a model's memory profile, the planner that turns a spec
and today's budgets into leases and engine parameters, and admission's one decision."""
