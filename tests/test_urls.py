"""The URL grammar's checks (app/net/urls.py) at their edges: the longest URL, the port
range, what a refusal quotes, and a row with no URLs. The grammar itself is tested in
tests/test_csv_upload.py, the hosts in tests/test_politeness.py."""

import pytest

from app.net.failures import InvalidUrl
from app.net.urls import MAX_URL_LENGTH, check_url, url_list_is_fine, url_problem


def test_a_url_of_the_longest_length_passes_both_checks_and_one_character_more_neither():
    url = "http://h.example/" + "a" * (MAX_URL_LENGTH - len("http://h.example/"))
    assert len(url) == MAX_URL_LENGTH
    assert url_problem(url) is None
    assert url_list_is_fine([url], f" {url},")
    longer = url + "a"
    assert url_problem(longer) == f"URL is longer than {MAX_URL_LENGTH} characters"
    assert not url_list_is_fine([longer], longer)


@pytest.mark.parametrize(("port", "valid"), [("1", True), ("65535", True), ("0", False), ("65536", False)])
def test_ports_from_1_to_65535_are_valid(port, valid):
    url = f"http://h.example:{port}/a.jpg"
    assert url_problem(url) is None if valid else url_problem(url) == f"URL {url!r} has an invalid port"


def test_a_refusal_quotes_the_first_80_characters_of_the_url():
    long_path = "/" + "p" * 100
    not_http = "ftp://h.example" + long_path
    assert url_problem(not_http) == f"URL {not_http[:80]!r} is not an absolute http(s) URL with a host"
    bad_port = "http://h.example:0" + long_path
    assert url_problem(bad_port) == f"URL {bad_port[:80]!r} has an invalid port"


def test_a_row_with_no_urls_is_left_to_the_one_by_one_check():
    """The upload says "no image URLs" for it (app/services/csv_input.py)."""
    assert url_list_is_fine([], "") is False
    assert url_list_is_fine([], " ;, ") is False


def test_check_url_raises_the_problem_url_problem_names_and_passes_a_valid_url():
    with pytest.raises(InvalidUrl) as failure:
        check_url("ftp://h.example/a.jpg")
    assert failure.value.message == url_problem("ftp://h.example/a.jpg")
    assert check_url("https://h.example/a.jpg") is None
