"""The upload page offers what the API offers: the output options with the defaults the
service would use, the API's own 422 messages beside the fields they are about, and a
sample CSV to download. The browser test is in tests/test_pages.py
(test_options_through_the_page_with_the_apis_messages_beside_the_fields)."""

import re

from fastapi.testclient import TestClient

from app.main import create_app
from app.pipeline.options import avif_supported

PAGE_OPTION_FIELDS = ("format", "quality", "max_width", "max_height", "keep_smaller", "progressive")


def test_the_page_offers_every_output_option_with_its_default(make_settings):
    with TestClient(create_app(make_settings(jpeg_quality=70, jpeg_progressive=True))) as client:
        html = client.get("/", headers={"Accept": "text/html"}).text
        sample = client.get("/static/sample-products.csv")
    for field in PAGE_OPTION_FIELDS:
        assert f'name="{field}"' in html, field
        assert f'id="{field}-problem"' in html, field
    assert re.search(r'name="quality"[^>]*value="70"', html)
    assert re.search(r'id="progressive"[^>]*checked', html)
    assert ('value="avif"' in html) == avif_supported()
    assert 'href="/static/sample-products.csv" download' in html
    assert sample.status_code == 200
    assert sample.text.splitlines()[0] == "S. No.,Product Name,Input Image Urls"
