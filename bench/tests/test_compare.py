"""bench.compare: two reproductions' claims side by side, a changed reading marked."""
from bench.compare import side_by_side
from tests.conftest import claim_results


def test_two_reproductions_claims_side_by_side_mark_each_changed_reading():
    table = side_by_side(claim_results(0.02), claim_results(0.0))
    assert table.count("**differ**") == 4 and table.count("| same:") == 2     # weight and method change
