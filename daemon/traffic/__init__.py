"""Traffic: the router's lanes (the decisions, synchronous), the control that drives them on
asyncio (with keep_alive), and what the router learns of each model's traffic."""
