"""A plain HTML view of a request's status, for people who open the status URL in a browser.

Every value that came from a user (names, URLs, errors) is escaped.
"""

from html import escape
from urllib.parse import urlencode

from app.api.schemas import RequestStatusOut

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}<title>Request {request_id}: {status}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left; vertical-align: top; }}
progress {{ width: 20rem; }} .failed {{ color: #a00; }} code {{ font-size: 12px; }}
img {{ max-height: 48px; max-width: 96px; }}
</style></head><body>
<h1>Request <code>{request_id}</code></h1>
<p>Status: <strong>{status}</strong> &middot; created {created_at} &middot; completed {completed_at}</p>
<p><progress max="100" value="{percent}"></progress> {percent}% &middot; {processed} succeeded,
{failed} failed of {total} images</p>
<p>{download} &middot; <a href="?{json_query}">JSON</a></p>
<table><thead><tr><th>S. No.</th><th>Product</th><th>Images</th></tr></thead><tbody>
{rows}
</tbody></table>
<p>{next_link}</p>
</body></html>
"""


def status_page(body: RequestStatusOut, limit: int, cursor: str | None) -> str:
    rows = []
    for product in body.products:
        cells = []
        for image in product.images:
            if image.output_url:
                cells.append(
                    f'<a href="{escape(image.output_url)}"><img src="{escape(image.output_url)}" alt=""></a>'
                )
            elif image.error:
                cells.append(
                    f'<span class="failed" title="{escape(image.input_url)}">'
                    f"{escape(image.error.code)}: {escape(image.error.message)}</span>"
                )
            else:
                cells.append(f'<span title="{escape(image.input_url)}">{escape(image.status)}</span>')
        rows.append(
            f"<tr><td>{product.serial_number}</td><td>{escape(product.product_name)}</td>"
            f"<td>{' '.join(cells)}</td></tr>"
        )
    finished = body.completed_at is not None
    query = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    return PAGE.format(
        refresh="" if finished else '<meta http-equiv="refresh" content="3">\n',
        request_id=escape(body.request_id),
        status=escape(body.status),
        created_at=body.created_at.isoformat(timespec="seconds"),
        completed_at=body.completed_at.isoformat(timespec="seconds") if finished else "not yet",
        percent=body.progress.percent,
        processed=body.progress.processed_images,
        failed=body.progress.failed_images,
        total=body.progress.total_images,
        download=f'<a href="{escape(body.download_url)}">Download the result CSV</a>'
        if body.download_url
        else "The result CSV is ready when the request finishes",
        json_query=escape(urlencode({**query, "format": "json"})),
        rows="\n".join(rows),
        next_link=_next_link(limit, body.next_cursor),
    )


def _next_link(limit: int, next_cursor: str | None) -> str:
    if not next_cursor:
        return ""
    return f'<a href="?{escape(urlencode({"limit": limit, "cursor": next_cursor}))}">Next page</a>'
