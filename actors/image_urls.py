"""Image parts of a chat request -> encoded image bytes: ``data:`` URLs, and allow-listed http(s) URLs.

Framework-free (httpx for the fetch; no Ray, no torch); decoding the bytes
into pixels is `specvlm.media.decode_image`'s job, with its limits.

``data:`` URLs: ``data:image/<type>;base64,<payload>``; the size is checked
before decoding, base64 strictly (ASCII whitespace ignored).

http(s) URLs (SSRF rules, in order; every refusal is a 400 naming the rule):

1. scheme http or https, no ``user:password@``, a port in ``allowed_ports``;
2. the host is in ``allowed_hosts`` (exact, or ``*.domain`` for subdomains)
   and is not a cloud-metadata name;
3. the host resolves, and every address it resolves to is globally routable:
   not private, loopback, link-local (169.254.169.254 included), CGNAT,
   multicast, reserved, unspecified, nor a metadata address, also when
   embedded in IPv6 (IPv4-mapped, SIIT, IPv4-compatible, NAT64, 6to4,
   Teredo); the local-use NAT64 prefix 64:ff9b:1::/48 is never public;
4. the connection goes to the checked address (``Host`` header and TLS SNI
   keep the name), so a second DNS answer cannot point it elsewhere;
5. no redirects, no proxies from the environment, ``timeout_s`` for the
   whole fetch, at most ``max_bytes`` read (Content-Length checked first).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from .openai_protocol import OpenAIError
from .serve_config import ImageFetchConfig

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]  # host, port -> addresses

METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})  # fmt: skip
METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16",
))  # fmt: skip
# IPv6 forms that carry an IPv4 address (a relay or translator turns them into IPv4 traffic)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")  # ::ffff:a.b.c.d, IPv4-mapped
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d, SIIT IPv4-translated (RFC 2765)
_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d, IPv4-compatible (deprecated, still routed by some stacks)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits (RFC 6052)
_NAT64_SPACE = ipaddress.ip_network("64:ff9b::/32")  # the rest: local-use 64:ff9b:1::/48 (RFC 8215), unassigned
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"[\t\n\r\f\v ]+")


def _bad(param: str, message: str, code: str = "invalid_image_url") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


def decode_data_url(url: str, max_bytes: int, param: str = "image_url") -> bytes:
    """The bytes of a base64 ``data:image/...`` URL; raises `OpenAIError` (400) for anything else."""
    m = _DATA_URL.match(url)
    if not m:
        raise _bad(param, "a data: URL must look like data:image/png;base64,<base64 payload>")
    mime = (m["mime"] or "").lower()
    if not mime.startswith("image/"):
        raise _bad(param, f"data: URL media type {mime or '(none)'!r} is not an image/* type", "invalid_image")
    payload = _WHITESPACE.sub(b"", url[m.end() :].encode("ascii", errors="replace"))
    if len(payload) * 3 // 4 > max_bytes:
        raise _bad(param, f"image is about {len(payload) * 3 // 4} bytes > max_image_bytes={max_bytes}",
                   "image_too_large")  # fmt: skip
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(param, f"invalid base64 in data: URL ({e})", "invalid_image") from None
    if not data:
        raise _bad(param, "data: URL holds no bytes", "invalid_image")
    return data


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address ``ip`` carries: IPv4-mapped, SIIT-translated, IPv4-compatible, well-known NAT64
    (last 32 bits), 6to4 (2002::/16) and Teredo (2001::/32: server, and the client un-XORed)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    out = [low32] if any(ip in net for net in (_MAPPED, _TRANSLATED, _COMPATIBLE, _NAT64)) else []
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    return out


def is_public(ip: IP) -> bool:
    """Globally routable unicast and not a metadata address; an IPv6 address that embeds an IPv4 one is public
    only if every IPv4 in it is. NAT64 prefixes other than the well-known /96 (the local-use 64:ff9b:1::/48
    translates into the operator's own network) are never public."""
    if not ip.is_global or ip.is_multicast or ip in METADATA_IPS:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_SPACE and ip not in _NAT64:
            return False
        return all(is_public(e) for e in embedded_ipv4(ip))
    return True


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` (lower-case, no trailing dot) equals an entry, or is a subdomain of a ``*.domain`` entry."""
    for a in allowed:
        if a.startswith("*."):
            if host.endswith(a[1:]) and len(host) > len(a) - 1:
                return True
        elif host == a:
            return True
    return False


def check_url(url: str, cfg: ImageFetchConfig, param: str = "image_url") -> tuple[str, str, int]:
    """Rules 1-2 for an http(s) URL: returns ``(scheme, host, port)``; raises `OpenAIError` (400)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _bad(param, f"malformed URL: {e}") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in ("http", "https"):
        raise _bad(param, f"image URLs must be data: or http(s) URLs, got scheme {scheme or '(none)'!r}")
    if parts.username is not None or parts.password is not None:
        raise _bad(param, "credentials in image URLs are not allowed")
    if not host:
        raise _bad(param, "URL has no host")
    port = port or (443 if scheme == "https" else 80)
    if not cfg.allowed_hosts:
        raise _bad(param, "http(s) image URLs are disabled on this server (no allowed hosts); send a data: URL",
                   "image_url_not_allowed")  # fmt: skip
    if host in METADATA_HOSTS or not host_allowed(host, cfg.allowed_hosts):
        raise _bad(param, f"host {host!r} is not in the server's image allow-list", "image_url_not_allowed")
    if port not in cfg.allowed_ports:
        raise _bad(param, f"port {port} is not allowed (allowed: {', '.join(map(str, cfg.allowed_ports))})",
                   "image_url_not_allowed")  # fmt: skip
    return scheme, host, port


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def resolve_public(host: str, port: int, resolve: Resolver, param: str = "image_url") -> IP:
    """Rule 3: the first address of ``host``, if every address it resolves to is public."""
    try:
        addrs = [ipaddress.ip_address(a.split("%")[0]) for a in await resolve(host, port)]
    except (OSError, ValueError) as e:
        raise _bad(param, f"cannot resolve host {host!r}: {e}") from None
    if not addrs:
        raise _bad(param, f"host {host!r} has no addresses")
    private = [a for a in addrs if not is_public(a)]
    if private:
        raise _bad(param, f"host {host!r} resolves to a non-public address ({private[0]}); refused",
                   "image_url_not_allowed")  # fmt: skip
    return addrs[0]


async def fetch_image_bytes(
    url: str,
    cfg: ImageFetchConfig,
    param: str = "image_url",
    resolve: Resolver | None = None,
    transport=None,
) -> bytes:
    """Rules 1-5: the body of an allow-listed http(s) image URL; raises `OpenAIError` (400).

    ``resolve`` and ``transport`` (an ``httpx`` transport) are for tests.
    """
    scheme, host, port = check_url(url, cfg, param)
    try:
        return await asyncio.wait_for(_fetch(url, cfg, param, scheme, host, port, resolve or system_resolve,
                                             transport), cfg.timeout_s)  # fmt: skip
    except asyncio.TimeoutError:
        raise _bad(param, f"fetching the image took longer than {cfg.timeout_s} s", "image_fetch_timeout") from None


async def _fetch(url, cfg, param, scheme, host, port, resolve, transport) -> bytes:
    import httpx

    ip = await resolve_public(host, port, resolve, param)
    parts = urlsplit(url)
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    default_port = 443 if scheme == "https" else 80
    netloc = ip_host if port == default_port else f"{ip_host}:{port}"
    pinned = parts._replace(netloc=netloc, fragment="").geturl()
    headers = {"Host": host if port == default_port else f"{host}:{port}", "Accept": "image/*"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    try:
        async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False,
                                     timeout=cfg.timeout_s) as client:  # fmt: skip
            async with client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
                if resp.is_redirect:
                    raise _bad(param, f"image URL answered HTTP {resp.status_code} (redirects are not followed)")
                if resp.status_code != 200:
                    raise _bad(param, f"image URL answered HTTP {resp.status_code}", "image_fetch_failed")
                length = resp.headers.get("content-length", "")
                if length.isdigit() and int(length) > cfg.max_bytes:
                    raise _bad(param, f"image is {length} bytes > max_bytes={cfg.max_bytes}", "image_too_large")
                body = bytearray()
                async for piece in resp.aiter_bytes():
                    body += piece
                    if len(body) > cfg.max_bytes:
                        raise _bad(param, f"image is over max_bytes={cfg.max_bytes}", "image_too_large")
                return bytes(body)
    except httpx.HTTPError as e:
        raise _bad(param, f"fetching the image failed: {type(e).__name__}: {e}", "image_fetch_failed") from None


async def image_bytes(url: str, cfg: ImageFetchConfig, max_bytes: int, param: str = "image_url", **test_hooks) -> bytes:
    """Encoded bytes of one ``image_url``: a data: URL, or an allow-listed http(s) URL."""
    if url[:5].lower() == "data:":
        return decode_data_url(url, max_bytes, param)
    return await fetch_image_bytes(url, cfg, param, **test_hooks)
