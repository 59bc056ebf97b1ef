"""Unit tests: pure functions and state machines. They start nothing: no process, no server, no socket."""
