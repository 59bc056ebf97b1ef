"""The README's generated sections match the code."""

from lessor.api.reference import api_table, config_reference

from ..support.paths import ROOT


def test_readme_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config_reference() in readme, "regenerate: python -m lessor.api.reference"
    assert api_table() in readme, "regenerate: python -m lessor.api.reference"


def _commands_with_a_config() -> set[tuple[str, bool]]:
    """(config, --sim) of every lessord/lessor command in the README's code blocks that names a
    shipped example: each must pass its own check-config, as lessord would run it."""
    import re
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", readme, flags=re.S)
    found = set()
    for line in (line for block in blocks for line in block.splitlines()):
        command = line.split("#", 1)[0]
        if not re.search(r"\blessor[d]?\b", command):
            continue
        for path in re.findall(r"(?:--config\s+|check-config\s+)(examples/\S+\.yaml)", command):
            found.add((path, "--sim" in command.split()))
    return found


def test_every_readme_command_passes_its_own_check(monkeypatch):
    """`lessor check-config examples/seed.yaml` exited 1 though the README starts lessord on it."""
    from lessor.daemon.config.checks import check
    from lessor.daemon.config.schema import load_config
    from lessor.daemon.devices.probes import SimProbe, make_probe

    commands = _commands_with_a_config()
    assert {path for path, _ in commands} >= {"examples/demo.yaml", "examples/seed.yaml", "examples/gpu-box.yaml"}
    monkeypatch.chdir(ROOT)  # the README's commands run from the checkout
    for path, sim in sorted(commands):
        config = load_config(ROOT / path)
        if not sim and config.devices.probe != "sim":
            try:
                on_nvml = not isinstance(make_probe(config.devices), SimProbe)
            except RuntimeError:  # probe nvml, no driver here: check-config warns, as below
                on_nvml = False
            if on_nvml:  # this machine may be the box: its files decide, not this test
                continue
        report = check(config, force_sim=sim)
        assert report.errors == 0, (path, [str(f) for f in report.findings if f.error])
