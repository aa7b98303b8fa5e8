"""The URL grammar: which URLs may be an image source or a webhook target, for the CSV
parser (a whole cell at once), the fetcher and the webhook deliverer alike."""

import re

from app.net.failures import InvalidUrl

MAX_URL_LENGTH = 2048


def _url_pattern(excluded: str = "", port: str = r"(?P<port>[0-9]{1,5})", host: str = "(?P<host>{})") -> str:
    """scheme://[userinfo@]host[:port][/path?query#fragment], with no whitespace or
    controls, nor any of `excluded` anywhere."""
    no = rf"\s\x00-\x1f\x7f{excluded}"
    hostname = host.format(rf"\[[0-9a-f:.]+\]|[^{no}/?#@:\[\]]+")
    return rf"https?://(?:[^{no}/?#@]*@)?{hostname}(?::{port})?(?:[/?#][^{no}]*)?"


_HTTP_URL = re.compile("(?i)" + _url_pattern())

# URLs as a CSV cell lists them: separated by whitespace, commas or semicolons (so none
# holds one). A cell matches _CHECKED_URL_LIST at once exactly when url_problem accepts
# each of its URLs; only cells it refuses go through url_problem URL by URL.
URL_LIST_SEPARATORS = r"[\s,;]"
# A port as url_problem accepts it: at most 5 digits, leading zeros allowed, 1 to 65535.
_PORT_1_TO_65535 = (
    r"(?=[0-9]{1,5}(?![0-9]))0*"
    r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
_CHECKED_URL = _url_pattern(",;", port=_PORT_1_TO_65535, host="(?:{})")
_CHECKED_URL_LIST = re.compile(
    rf"(?i){URL_LIST_SEPARATORS}*{_CHECKED_URL}(?:{URL_LIST_SEPARATORS}+{_CHECKED_URL})*{URL_LIST_SEPARATORS}*"
)


def url_list_is_fine(urls: list[str], cell: str) -> bool:
    """True when every URL of `urls`, split from `cell`, is one url_problem accepts; False
    means that some may not be, and url_problem says which."""
    return max(map(len, urls), default=0) <= MAX_URL_LENGTH and _CHECKED_URL_LIST.fullmatch(cell) is not None


def url_problem(url: str) -> str | None:
    """Why url cannot be an image source, or None if it can.

    A single regular expression, not urlsplit: this runs for every URL of a CSV that
    may hold hundreds of thousands of them."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is longer than {MAX_URL_LENGTH} characters"
    match = _HTTP_URL.fullmatch(url)
    if match is None:
        return f"URL {url[:80]!r} is not an absolute http(s) URL with a host"
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return f"URL {url[:80]!r} has an invalid port"
    return None


def check_url(url: str) -> None:
    problem = url_problem(url)
    if problem:
        raise InvalidUrl(problem)


_DEFAULT_PORTS = (":80", ":443")


def url_host(url: str) -> str:
    """The origin a URL is fetched from, as per-host politeness counts it: the host,
    lower-cased, with the port when the URL names one other than its scheme's default
    (two servers on one machine are two origins). For URLs url_problem accepts."""
    # String methods, not a regular expression: uploads call this for every URL, and
    # this is about three times faster.
    parts = url.split("/", 3)
    if len(parts) < 3:
        return ""
    authority = parts[2]
    for end in "?#":
        if end in authority:
            authority = authority[: authority.index(end)]
    host = authority.rpartition("@")[2].lower()
    if host.endswith(_DEFAULT_PORTS):
        name, _, port = host.rpartition(":")
        if (port == "80") == (parts[0].lower() == "http:"):
            return name
    return host


class UrlHosts:
    """url_host over many URLs, as an upload reads them: remembered by the URL's start up
    to the "/" after its authority (a catalogue names a few hosts many times), so a URL
    costs a find, a slice and a dict lookup. The same start gives the same host: url_host
    reads only the scheme and the authority."""

    MAX_REMEMBERED = 4096

    def __init__(self) -> None:
        self._hosts: dict[str, str] = {}

    def __call__(self, url: str) -> str:
        # Past "http://" and the authority's first character, or past "https://".
        end = url.find("/", 8)
        start = url if end < 0 else url[:end]
        host = self._hosts.get(start)
        if host is None:
            if len(self._hosts) >= self.MAX_REMEMBERED:  # URLs with no path: one start each
                self._hosts.clear()
            host = self._hosts[start] = url_host(url)
        return host
