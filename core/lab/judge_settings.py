"""The judge's server settings for a shared room, in one place, with safe defaults.

Each setting is an environment variable of the process that runs the app (or `python -m core`);
docs/offline-judge.md documents them for the teacher. They are read when used, so a test or a
server can change them without a restart.

    GLASSBOX_JUDGE_ENDPOINTS    comma-separated judge base URLs that are allowed, e.g.
                                "http://10.0.0.5:8000/v1,https://api.openai.com/v1". Unset: any
                                public http(s) host, plus the local presets' exact URLs.
                                Set: only these (a listed private host is allowed).
    GLASSBOX_JUDGE_ALLOW_HOSTS  which non-public hosts any URL may use: "loopback", "private"
                                (10/8, 172.16/12, 192.168/16, fc00::/7), "link-local"
                                (169.254/16: cloud metadata!), comma-separated. Default: none.
    GLASSBOX_JUDGE_KEY_URL      the one base URL the environment's OPENAI_API_KEY may be sent to.
                                The app never sends its own key anywhere else. Default:
                                https://api.openai.com/v1. From a shell, `python -m core judge`
                                sends your exported key where you point it unless this is set.
    GLASSBOX_JUDGE_API_KEY      a key given for one run (the page passes the learner's typed key
                                to its job this way): used with that run's URL, whatever it is.
    GLASSBOX_JUDGE_MAX_FAILURES judgements failing in a row before a run stops (default 10).
    GLASSBOX_JUDGE_GIVE_UP_S    seconds without a single reply from the judge before a run gives
                                up, however many retries are left (default 900).

Redirects are never followed, and every URL that is shown or saved goes through `redact_url`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from core.lab.errors import JudgeError

ENDPOINTS_ENV = "GLASSBOX_JUDGE_ENDPOINTS"
ALLOW_HOSTS_ENV = "GLASSBOX_JUDGE_ALLOW_HOSTS"
KEY_URL_ENV = "GLASSBOX_JUDGE_KEY_URL"
RUN_KEY_ENV = "GLASSBOX_JUDGE_API_KEY"
SERVER_KEY_ENV = "OPENAI_API_KEY"
MAX_FAILURES_ENV = "GLASSBOX_JUDGE_MAX_FAILURES"
GIVE_UP_ENV = "GLASSBOX_JUDGE_GIVE_UP_S"

DEFAULT_KEY_URL = "https://api.openai.com/v1"
DEFAULT_MAX_FAILURES = 10
DEFAULT_GIVE_UP_S = 900.0
# The local servers of the page's presets (and `python -m core serve`): allowed by default even
# though they are loopback, because they are the offline judges docs/offline-judge.md sets up.
LOCAL_PRESET_URLS = ("http://localhost:11434/v1", "http://localhost:8080/v1", "http://localhost:1234/v1",
                     "http://localhost:8000/v1", "http://127.0.0.1:8080/v1", "http://127.0.0.1:8000/v1")
HOST_KINDS = ("loopback", "private", "link-local")


class EndpointRefused(JudgeError):
    """The judge URL is not allowed on this server (its host, or the allow-list)."""


@dataclass(frozen=True)
class JudgeServerSettings:
    endpoints: tuple[str, ...]      # empty: any public host + the local presets
    allow_hosts: frozenset[str]     # non-public host kinds allowed for any URL
    key_url: str | None             # where OPENAI_API_KEY may go (None: not pinned from a shell)
    max_failures: int
    give_up_s: float


def _number(name: str, default: float, kind=float):
    try:
        value = kind(os.environ.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


def current() -> JudgeServerSettings:
    """The settings as the environment says now."""
    endpoints = tuple(u.strip() for u in os.environ.get(ENDPOINTS_ENV, "").split(",") if u.strip())
    kinds = {k.strip().lower() for k in os.environ.get(ALLOW_HOSTS_ENV, "").split(",") if k.strip()}
    return JudgeServerSettings(endpoints=endpoints, allow_hosts=frozenset(kinds & set(HOST_KINDS)),
                               key_url=os.environ.get(KEY_URL_ENV) or None,
                               max_failures=int(_number(MAX_FAILURES_ENV, DEFAULT_MAX_FAILURES, int)),
                               give_up_s=float(_number(GIVE_UP_ENV, DEFAULT_GIVE_UP_S)))


# ---------------------------------------------------------------------------- URLs shown or saved

def redact_url(url: str) -> str:
    """A URL safe to show or save: no `user:password@`, every query value masked, no fragment."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    if parts.query and not query:
        query = "***"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _origin(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def same_endpoint(a: str, b: str) -> bool:
    """Same scheme, host, port and path (a trailing slash and letter case of the host aside)."""
    try:
        return _origin(a) == _origin(b)
    except ValueError:
        return False


# ---------------------------------------------------------------------------- which hosts

def host_kind(address: str) -> str | None:
    """'loopback', 'private', 'link-local' (or 'reserved') for a non-public IP; None if public."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_reserved or ip.is_multicast:
        return "reserved"
    if ip.is_private or not ip.is_global:   # 10/8, 192.168/16, fc00::/7, 100.64/10 (carrier NAT), ...
        return "private"
    return None


def _addresses(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
    except (socket.gaierror, UnicodeError, OSError):
        return []  # cannot resolve: the connection itself will fail with a clear message


def _refusal(url: str, kind: str, address: str) -> EndpointRefused:
    return EndpointRefused(
        f"The judge URL {redact_url(url)} points at a {kind} address ({address}), which this server "
        f"does not call unless allowed. The teacher can allow it with {ALLOW_HOSTS_ENV}={kind} "
        f"or list the URL in {ENDPOINTS_ENV} (docs/offline-judge.md).")


def named_endpoint(url: str, settings: JudgeServerSettings) -> bool:
    """True for a URL allowed by name: listed in the allow-list, or (no list) a local preset."""
    if settings.endpoints:
        return any(same_endpoint(url, allowed) for allowed in settings.endpoints)
    return any(same_endpoint(url, preset) for preset in LOCAL_PRESET_URLS)


def check_base_url(url: str, settings: JudgeServerSettings | None = None) -> None:
    """Raise EndpointRefused unless this server may call the judge at `url`."""
    settings = settings or current()
    if settings.endpoints and not named_endpoint(url, settings):
        raise EndpointRefused(f"The judge URL {redact_url(url)} is not one this server allows "
                              f"({ENDPOINTS_ENV}: {', '.join(map(redact_url, settings.endpoints))}).")
    _, host, port, _ = _origin(url)
    check_address(url, _addresses(host, port), settings)


def check_address(url: str, addresses: list[str], settings: JudgeServerSettings | None = None) -> None:
    """Refuse non-public addresses (resolved now, or the one actually connected to) unless the
    URL is allowed by name or their kind is allowed."""
    settings = settings or current()
    if named_endpoint(url, settings):
        return
    for address in addresses:
        kind = host_kind(address)
        if kind is not None and kind not in settings.allow_hosts:
            raise _refusal(url, kind, address)


# ---------------------------------------------------------------------------- which key goes where

def server_key_for(base_url: str, settings: JudgeServerSettings | None = None) -> str:
    """The app server's own OPENAI_API_KEY if `base_url` is the URL it is pinned to, else ""."""
    settings = settings or current()
    pinned = settings.key_url or DEFAULT_KEY_URL
    key = os.environ.get(SERVER_KEY_ENV, "")
    return key if key and same_endpoint(base_url, pinned) else ""


def command_line_key(base_url: str, settings: JudgeServerSettings | None = None) -> str:
    """The key `python -m core judge` sends: one given for this run, else OPENAI_API_KEY if no pin
    is set or `base_url` is the pinned URL."""
    settings = settings or current()
    given = os.environ.get(RUN_KEY_ENV, "")
    if given:
        return given
    key = os.environ.get(SERVER_KEY_ENV, "")
    if settings.key_url and not same_endpoint(base_url, settings.key_url):
        return ""
    return key


def job_env(key: str) -> dict[str, str]:
    """The environment a judge job gets: exactly the key chosen for it, the inherited one blanked."""
    return {RUN_KEY_ENV: key or "", SERVER_KEY_ENV: ""}
