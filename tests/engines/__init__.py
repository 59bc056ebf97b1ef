"""Engine tests: real engine processes (the built-in torch engine, llama.cpp, vLLM's CPU build, the stand-in server), started by lessor's adapters, in this process or behind a real lessord."""
