import pandas as pd
import pytest

from unetops.errors import UnetopsError
from unetops.validation import Rule, check_frame

RULES = [
    Rule("mask must be binary", "ExpectColumnValuesToBeInSet",
         {"column": "binary", "value_set": [True]}),
    Rule("mask must have the image's size", "ExpectColumnPairValuesToBeEqual",
         {"column_A": "height", "column_B": "image_height"}),
]


def test_passing_frame_is_silent():
    frame = pd.DataFrame({"path": ["a.png"], "binary": [True], "height": [4], "image_height": [4]})
    check_frame(frame, RULES, "manifest")


def test_failure_names_first_bad_file_and_rule():
    frame = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "binary": [True, True, False],
                          "height": [4, 5, 4], "image_height": [4, 4, 4]})
    with pytest.raises(UnetopsError) as err:
        check_frame(frame, RULES, "manifest")
    assert str(err.value) == "c.png: mask must be binary (expect_column_values_to_be_in_set)"


def test_empty_frame_is_an_error():
    with pytest.raises(UnetopsError, match="^manifest: no cases"):
        check_frame(pd.DataFrame({"path": []}), RULES, "manifest")
