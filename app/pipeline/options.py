"""What a batch asks of its outputs: format, quality, largest size, and whether a smaller
input is kept as it is. Chosen at upload, stored with the request (a JSON text column),
read with each claim and carried in every WorkUnit, so every runner honours them without
a query per image.

A request stored before options existed has none (NULL): its units carry None and the
stages use the settings (JPEG_QUALITY, JPEG_PROGRESSIVE), exactly as before.
"""

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from PIL import features

from app.errors import InvalidInput

FORMATS = ("jpeg", "webp", "avif")
# Pillow's name for each format, the output key's extension and the stored Content-Type.
PILLOW_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
EXTENSION = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}
CONTENT_TYPE = {"jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
MIN_QUALITY, MAX_QUALITY = 1, 95
MAX_DIMENSION = 20_000
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class OutputOptions:
    quality: int
    format: str = "jpeg"
    max_width: int | None = None
    max_height: int | None = None
    keep_smaller: bool = False
    progressive: bool = False

    @property
    def extension(self) -> str:
        return EXTENSION[self.format]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE[self.format]

    @property
    def pillow_format(self) -> str:
        return PILLOW_FORMAT[self.format]

    @property
    def max_size(self) -> tuple[int, int] | None:
        """The box the output must fit in, or None for no limit."""
        if self.max_width is None and self.max_height is None:
            return None
        return (self.max_width or MAX_DIMENSION * 10, self.max_height or MAX_DIMENSION * 10)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def as_dict(self) -> dict:
        return asdict(self)


def avif_supported() -> bool:
    return features.check("avif") is True


@lru_cache(maxsize=256)
def options_from_json(text: str | None) -> OutputOptions | None:
    """The stored options (cached: each claim reads the same few strings again)."""
    if not text:
        return None
    return OutputOptions(**json.loads(text))


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
