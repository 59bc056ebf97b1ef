"""The README's generated sections match the code."""

from lessor.api.reference import api_table, config_reference

from .conftest import ROOT


def test_readme_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config_reference() in readme, "regenerate: python -m lessor.api.reference"
    assert api_table() in readme, "regenerate: python -m lessor.api.reference"
