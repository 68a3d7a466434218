"""The second half of tests/test_bad_inputs.py's cases: the same check and fixture, in a
file of its own so that the suite's two workers share the cases (each is a fresh
interpreter)."""
import pytest

from test_bad_inputs import SECOND_HALF, case_ids, check_case, files  # noqa: F401 (the fixture)


@pytest.mark.parametrize("what,script,args,needle", SECOND_HALF, ids=case_ids(SECOND_HALF))
def test_bad_input_is_one_error_line(what, script, args, needle, files):  # noqa: F811
    check_case(what, script, args, needle, files)
