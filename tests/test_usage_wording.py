"""Usage errors read the same whichever Typer words them: pyproject asks for Typer < 0.29 (Click's
types), but an environment may still hold 0.29 (pydantic validators). Both wordings, as each
Typer prints them, map to one plain message."""

from __future__ import annotations

import pytest

from ce_cli.cli.app import expected_value

CASES = [  # (Typer < 0.29 / Click, Typer 0.29 / pydantic, plain)
    ("'x' is not a valid int.", "Input should be a valid integer, unable to parse string as an "
     "integer", "a whole number"),
    ("'abc' is not a valid float.", "Input should be a valid number, unable to parse string as a "
     "number", "a number"),
    ("-1 is not in the range x>=0.", "Input should be greater than or equal to 0", ">= 0"),
    ("7 is not in the range x<=5.", "Input should be less than or equal to 5", "<= 5"),
    ("'maybe' is not a valid boolean. Recognized values: ...", "Input should be a valid boolean, "
     "unable to interpret input", "true or false"),
]


@pytest.mark.parametrize("click_words, pydantic_words, plain", CASES)
def test_both_wordings_give_one_plain_message(click_words, pydantic_words, plain):
    assert expected_value(click_words) == plain
    assert expected_value(pydantic_words) == plain


def test_other_messages_are_left_alone():
    assert expected_value("Option '--grad' requires an argument.") is None
