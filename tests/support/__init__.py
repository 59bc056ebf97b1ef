"""Test infrastructure: what the tests import (paths, waiting, configs, fake engines, clients of a
real lessord, the servers they start), by what it is. No tests here; the fixtures stay in
tests/conftest.py, built from these. bench/ imports none of it."""
