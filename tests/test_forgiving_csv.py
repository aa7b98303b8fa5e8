"""Spreadsheet exports: unquoted URL lists, and URLs separated by commas, semicolons,
spaces or newlines inside the cell. What is not a URL is still refused."""

import pytest

from tests.conftest import upload
from tests.test_csv_upload import HEADER, parse

A, B, C = (f"https://images.example.com/{name}.jpg" for name in "abc")


def test_an_unquoted_url_list_is_one_row_with_every_url():
    rows, errors = parse(f"{HEADER}\n1,SKU1,{A},{B},{C}\n2,SKU2,{A}\n".encode())
    assert not errors, errors.items
    assert [row.image_urls for row in rows] == [[A, B, C], [A]]


def test_empty_trailing_cells_of_an_unquoted_list_are_ignored():
    rows, errors = parse(f"{HEADER}\n1,SKU1,{A},{B},,\n".encode())
    assert not errors and rows[0].image_urls == [A, B]


@pytest.mark.parametrize("separator", [",", ", ", ";", "; ", " ", "\n", "\r\n", "\t", " ,\n; "])
def test_urls_in_the_quoted_cell_may_be_separated_by_commas_semicolons_or_whitespace(separator):
    rows, errors = parse(f'{HEADER}\n1,SKU1,"{A}{separator}{B}{separator}{C}"\n'.encode())
    assert not errors, errors.items
    assert rows[0].image_urls == [A, B, C]


def test_an_extra_column_that_is_not_a_url_is_refused_naming_its_line_and_column(client):
    response = upload(client, f"{HEADER}\n1,SKU1,{A}\n2,SKU2,{A},{B},blue\n".encode())
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert (error["line"], error["column"]) == (3, "column 5")
    assert "'blue' is not a URL" in error["message"]
    assert client.get("/requests").json()["items"] == []


def test_extra_columns_are_not_urls_when_the_url_column_is_not_last():
    rows, errors = parse(f"Input Image Urls,S. No.,Product Name\n{A},1,SKU1,{B}\n".encode())
    assert rows == [] and errors.items[0]["message"] == "expected 3 columns, found 4"


def test_an_unquoted_list_is_checked_like_a_quoted_one():
    _, errors = parse(f"{HEADER}\n1,SKU1,{A},https://images.example.com/{'b' * 2100}\n".encode())
    assert errors.items[0]["column"] == "Input Image Urls"
    _, errors = parse(f"{HEADER}\n1,SKU1,{A},{B},{C}\n".encode(), max_urls_per_row=2)
    assert "at most 2 per row" in errors.items[0]["message"]
