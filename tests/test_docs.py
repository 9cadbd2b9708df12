"""The README stays in step with the predictor."""

from commands.readme_table import README, inputs_table, readme_table


def test_readme_inputs_table_matches_the_predictor():
    assert readme_table(README.read_text()) == inputs_table(), "run: python -m commands.readme_table --write"


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
