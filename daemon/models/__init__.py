"""Models: each model's lifecycle as the supervisor owns it, and the supervisor's parts (the load
protocol, adoption, crash restarts, elastic KV, verified unloads, load sampling, timelines, the
fingerprints a load is measured under, engine health)."""
