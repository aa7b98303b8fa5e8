"""Sentences a person understands for the error codes of failed images.

The request page shows these beside each failed image; the table goes to its script
whole (ERROR_SENTENCES_FOR_PAGES), so the browser and describe_image_error() agree.
"""

import re

from app.errors import InvalidInput

IMAGE_ERROR_SENTENCES: dict[str, str] = {
    "invalid_url": "the URL is not a valid http or https address: check the URL",
    "blocked_address": "the URL points to a private or local network address, which is not fetched",
    "timeout": "the image server did not send the image in time: try again later or check the server",
    "connection_error": "the image server could not be reached: check the host name in the URL",
    "broken_download": "the image server stopped sending halfway through: try again later",
    "too_many_redirects": "the URL redirects too many times: use the image's final address",
    "too_large": "the image is larger than this service accepts",
    "fetch_failed": "the image could not be downloaded",
    "not_an_image": "the URL returned something other than an image (a web page?): check the URL",
    "corrupt_image": "the image file is damaged and cannot be read",
    "decompression_bomb": "the image has more pixels than this service accepts",
    "over_memory_budget": "the image is too large to decode within this service's memory limit",
    "compress_failed": "the image could not be converted to JPEG",
    "worker_crashed": "reading this image crashed the image decoder several times, so it was given up",
    "storage_error": "the converted image could not be stored; it will be tried again",
    "internal_error": "something went wrong inside the service with this image",
}

HTTP_STATUS_SENTENCES: dict[str, str] = {
    "401": "the image server answered 401: the image needs a login, so use a public URL",
    "403": "the image server answered 403: access is refused, so use a public URL",
    "404": "the image server answered 404: check the URL",
    "410": "the image server answered 410: the image has been removed",
    "429": "the image server answered 429 (too many requests) until the time ran out: try again later",
    "4xx": "the image server answered {status}: check the URL",
    "5xx": "the image server answered {status} (a server error): try again later",
    "other": "the image server answered {status} instead of sending the image",
}

_HTTP_CODE = re.compile(r"http_([0-9]{3})")

ERROR_SENTENCES_FOR_PAGES = {"codes": IMAGE_ERROR_SENTENCES, "http": HTTP_STATUS_SENTENCES}


def describe_image_error(code: str) -> str:
    """A sentence for an image's error code; unknown codes get a general one."""
    http = _HTTP_CODE.fullmatch(code)
    if http:
        status = http.group(1)
        family = {"4": "4xx", "5": "5xx"}.get(status[0], "other")
        template = HTTP_STATUS_SENTENCES.get(status) or HTTP_STATUS_SENTENCES[family]
        return template.format(status=status)
    return IMAGE_ERROR_SENTENCES.get(code, f"the image failed ({code})")


def parse_error_codes(text: str | None) -> frozenset[str] | None:
    """Error codes given as `http_404,http_429` (commas or spaces between them); None when
    none is given. A code no image can fail with is refused, naming each such code."""
    codes = frozenset(code for code in re.split(r"[\s,]+", text or "") if code)
    if not codes:
        return None
    unknown = sorted(
        code for code in codes if code not in IMAGE_ERROR_SENTENCES and not _HTTP_CODE.fullmatch(code)
    )
    if unknown:
        raise InvalidInput(
            f"codes: unknown error codes: {', '.join(c[:64] for c in unknown[:20])}",
            unknown_codes=[c[:64] for c in unknown[:20]],
        )
    return codes
