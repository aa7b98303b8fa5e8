"""What a batch asks of its outputs: format, quality, largest size, and whether a smaller
input is kept as it is. Chosen at upload, stored with the request (a JSON text column),
read with each claim and carried in every WorkUnit, so every runner honours them without
a query per image.

A request stored before options existed has none (NULL): its units carry None and the
stages use the settings (JPEG_QUALITY, JPEG_PROGRESSIVE), exactly as before.
"""

from PIL import features

from app.errors import InvalidInput
from app.ledger.units import (
    FORMATS,
    MAX_DIMENSION,
    MAX_QUALITY,
    MIN_QUALITY,
    OutputOptions,
    options_from_json,
)

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def avif_supported() -> bool:
    return features.check("avif") is True


def stored_options(text: str | None, *, default_quality: int, default_progressive: bool) -> OutputOptions:
    """A request's options; for one stored before options existed, the settings'."""
    return options_from_json(text) or OutputOptions(quality=default_quality, progressive=default_progressive)


def _whole_number(field: str, raw: str, low: int, high: int, problems: list[dict]) -> int | None:
    value = raw.strip()
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        message = f"{raw[:40]!r} is not a whole number from {low} to {high}"
        problems.append({"field": field, "message": message})
        return None
    return int(value)


def _flag(field: str, raw: str, problems: list[dict]) -> bool | None:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    problems.append({"field": field, "message": f"{raw[:40]!r} is not true or false"})
    return None


def options_from_form(
    *,
    quality: str | None,
    max_width: str | None,
    max_height: str | None,
    output_format: str | None,
    keep_smaller: str | None,
    progressive: str | None,
    default_quality: int,
    default_progressive: bool,
) -> OutputOptions:
    """The options of an upload's form fields, absent ones from the settings; raises
    InvalidInput naming every field that is wrong."""
    problems: list[dict] = []
    chosen: dict = {"quality": default_quality, "progressive": default_progressive}
    if quality is not None:
        chosen["quality"] = _whole_number("quality", quality, MIN_QUALITY, MAX_QUALITY, problems)
    for field, raw in (("max_width", max_width), ("max_height", max_height)):
        if raw is not None:
            chosen[field] = _whole_number(field, raw, 1, MAX_DIMENSION, problems)
    if output_format is not None:
        name = output_format.strip().lower()
        if name not in FORMATS:
            problems.append(
                {"field": "format", "message": f"{output_format[:40]!r} is not one of {', '.join(FORMATS)}"}
            )
        elif name == "avif" and not avif_supported():
            problems.append(
                {"field": "format", "message": "avif: the Pillow installed on this server cannot write AVIF"}
            )
        else:
            chosen["format"] = name
    for field, raw in (("keep_smaller", keep_smaller), ("progressive", progressive)):
        if raw is not None:
            chosen[field] = _flag(field, raw, problems)
    if problems:
        fields = ", ".join(problem["field"] for problem in problems)
        raise InvalidInput(f"invalid option(s): {fields}; nothing was stored", errors=problems)
    return OutputOptions(**chosen)
