"""Bad input, generated: hypothesis mutates the shipped configs (every rejection is a ConfigError
naming the field, never a traceback), and schemathesis fuzzes the admin API of a running lessord
from its own /openapi.json (no 5xx, every answer as documented)."""

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lessor.daemon.config.schema import load_config, parse_config
from lessor.daemon.errors import ConfigError

from ..support.configs import config_file, standin_spec
from ..support.lessord import running_lessord
from ..support.paths import ROOT

EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))]
CONFIG_EXAMPLES = 400  # per run; the figure the README quotes
API_EXAMPLES = 15  # per operation

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["8GiB", "-1", "1e9", "0", "5m", "never", "-3GiB", "1.5.2G", "auto", "nvml", "sim", "*",
                     "127.0.0.1:0", "localhost:99999", ":80", "torch", "vllm", "mqtt://x", "lru_idle", " "]),
    st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def paths(value, prefix=()):
    """Every place in a nested config a mutation can touch."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, prefix + (i,))


@st.composite
def mutated_configs(draw):
    config = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(list(paths(config))))
        if not where:
            continue
        parent = config
        for part in where[:-1]:
            parent = parent[part]
        key, action = where[-1], draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(leaves)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["colour", "weights", "kind", "max_batch_size", "pinned", "api_keys"]))] = draw(leaves)
    return config


FIELD_IN_REASON = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")


@settings(max_examples=CONFIG_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_generated_configs_load_or_name_the_field(data):
    try:
        parse_config(data, source="fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.reason and (problem.path or FIELD_IN_REASON.match(problem.reason)), problem
            assert "Traceback" not in problem.reason


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_generated_files_are_read_or_refused_with_a_reason(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "lessor.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems and all(p.reason for p in exc.problems)


def schemathesis_bin() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]' (the test extra has it)")
    return found


def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(tmp_path):
    """Every operation of /openapi.json, positive and negative data, stateful sequences; the checks:
    no 5xx, status codes, content types, headers and bodies as documented, bad input rejected, auth
    enforced. Excluded: positive_data_acceptance, which expects any schema-valid body to succeed;
    lessor validates overrides against the model's own engine (a field that is valid for vLLM is
    refused for llama.cpp with 422 naming it), which a static schema cannot express.

    The what-if call that sets a simulated device's foreign usage goes last, in a pass of its own:
    once it has filled the device, a load's honest answer is 503 with Retry-After (no memory now),
    which would hide a real server error among designed ones."""
    config = config_file(tmp_path, [standin_spec("a", tmp_path), standin_spec("b", tmp_path)],
                         devices={"probe": "sim", "simulated": [{"name": "sim24", "total": "24GiB", "foreign": "2GiB"}]})
    generated = 0
    with running_lessord(config, output=tmp_path / "lessord.out") as (proc, url, _):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        for scope in ("--exclude-path-regex", "--include-path-regex"):
            result = subprocess.run(
                [schemathesis_bin(), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {token}",
                 scope, "/foreign$", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                 "-n", str(API_EXAMPLES), "--seed", "20261125", "-w", "1", "--no-color"],
                capture_output=True, text=True, timeout=300, cwd=tmp_path)
            summary = result.stdout[-4000:]
            assert result.returncode == 0, summary
            found = re.search(r"(\d+) generated", summary)
            assert found, summary
            generated += int(found.group(1))
        assert proc.poll() is None, "lessord died under the fuzzer"
    assert generated >= 10 * API_EXAMPLES
    print(f"schemathesis: {generated} requests generated against {url}/openapi.json, all passed")
    log = (tmp_path / "lessord.out").read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
