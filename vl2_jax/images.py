"""Image references (paths, file://, http(s) and data URLs, raw base64) -> RGB PIL images, within limits.

One entry point serves the command line (``--image``, ``/image``) and an HTTP server (OpenAI
``image_url`` content parts, SGLang ``image_data``)::

    load_image(ref: str, limits: ImageLimits = ImageLimits()) -> PIL.Image.Image
    ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000, timeout_s=10.0, max_redirects=3,
                allow_fetch=True, local_dir=None, allow_private=False, formats=SAFE_FORMATS)
    ImageLimits.cli() -> ImageLimits       # the command line's limits (below)
    local_path(ref: str) -> str | None     # the file a path or file:// reference names, else None
    describe(ref: str) -> str              # the reference as messages name it (long ones shortened)

What ``ref`` may be (its scheme decides, case-insensitive; a string without one is raw base64 if it
looks like it, else a path; surrounding whitespace is ignored):

* ``data:[<media type>][;base64],<data>``: the RFC 2397 data URL of OpenAI's ``image_url``. The media
  type must be empty, ``image/*`` or ``application/octet-stream``; the data is standard or URL-safe
  base64 (line breaks allowed, padding required) when ``;base64`` is given, else percent-encoded bytes.
* ``http://`` and ``https://`` URLs, fetched with the standard library (``http.client``; no proxy
  settings are read) when ``allow_fetch``: redirects (301, 302, 303, 307, 308) are followed by hand, at
  most ``max_redirects`` of them, and every hop's host is resolved here and, unless ``allow_private``,
  each of its addresses must be public (not private, loopback, link-local, multicast, reserved, shared
  or unspecified; an IPv4-mapped IPv6 address is judged as its IPv4 address). The connection goes to an
  address that was checked, so a second DNS answer cannot redirect it (TLS still verifies the host
  name). The whole fetch, DNS lookups and every hop included, must end within ``timeout_s``; the body
  is read in chunks and refused past ``max_bytes``.
* ``file://`` URLs (``file:///abs/path`` or ``file://localhost/abs/path``, percent-encoded) and plain
  paths, read only when ``local_dir`` is set and the path, resolved with its symbolic links (``..``
  included), lies inside ``local_dir`` (itself resolved). ``local_dir="/"`` allows every local file (the
  command line's choice); ``None`` (the default, a server's) refuses every local file. Relative paths
  start at ``local_dir`` (at the current directory where it is ``"/"``). Only regular files are read.
* Raw base64, as SGLang's ``image_data`` allows: a string with no scheme, at least 64 characters long
  and made only of base64 characters (the standard or the URL-safe alphabet, not both; ``=`` padding, line breaks).
  Such a string is no plausible file name (no ``.``, no extension); a path that looks like base64 can
  be written ``./PATH`` or ``file:///absolute/path``, and an image under 48 bytes as a data URL.
* Any other ``scheme://`` is refused.

The bytes are then opened with PIL restricted to ``formats`` (``None``: every format PIL reads), refused
over ``max_pixels`` (width x height, read from the header before anything is decoded; PIL's own
decompression-bomb guard, ``PIL.Image.MAX_IMAGE_PIXELS``, also applies: over twice it PIL refuses,
reported the same way; between once and twice ``max_pixels`` decides, PIL's warning hidden on the main
thread),
decoded in full and converted with ``convert("RGB")``, as ``processor.open_image`` does and the
reference's callers do: no EXIF rotation, the first frame of an animation.

Errors: every failure is one :class:`vl2_jax.errors.InputError` sentence that names the reference (a
long one shortened by :func:`describe`, so a data URL does not fill a log) and says what to do; never a
traceback (``MemoryError`` on the host passes through). ``load_image`` blocks (a fetch can take up to
``timeout_s``), keeps no state and is safe to call from several threads; a server calls it from a thread
pool. A DNS lookup that outlives the time limit is left to finish in a daemon thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
import warnings

from PIL import Image

from vl2_jax.errors import InputError, one_line

SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
"""PIL formats a server opens by default: the common photo and screenshot formats, and none whose
plugin runs an outside program (EPS runs Ghostscript)."""

_REDIRECTS = (301, 302, 303, 307, 308)
_BASE64 = re.compile(r"([A-Za-z0-9+/\s]+|[A-Za-z0-9\-_\s]+)=*\s*")  # (standard or URL-safe: one alphabet)
_MIN_RAW_BASE64 = 64
_SHOWN = 96  # characters of a long reference shown in messages
_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What :func:`load_image` accepts. The defaults are a server's: no local files, public addresses
    only, 20 MB, 40 megapixels, 10 s.

    Attributes:
      max_bytes: the most bytes an image may have, encoded (a file, a fetched body, a decoded data URL).
      max_pixels: the most pixels (width x height) an image may have.
      timeout_s: seconds a whole http(s) fetch may take, redirects and DNS lookups included.
      max_redirects: the most redirects one fetch follows.
      allow_fetch: whether http(s) URLs are fetched at all.
      local_dir: the folder local paths and file:// URLs must resolve into; "/" allows every local
        file, None refuses them all.
      allow_private: whether fetched hosts may resolve to non-public addresses (tests with a local
        server; the command line).
      formats: PIL format names an image may have; None allows every format PIL reads.
    """

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0
    max_redirects: int = 3
    allow_fetch: bool = True
    local_dir: str | os.PathLike | None = None
    allow_private: bool = False
    formats: tuple[str, ...] | None = SAFE_FORMATS

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError(f"ImageLimits needs max_bytes, max_pixels and timeout_s above 0 and max_redirects "
                             f"at least 0 (got {self})")

    @classmethod
    def cli(cls) -> ImageLimits:
        """The command line's limits: the user's own files anywhere, any format PIL reads, PIL's own pixel
        limit (as ``processor.open_image``), up to 1 GiB, and fetches to any address (the user can reach
        a private address anyway) within 30 s."""
        return cls(max_bytes=1 << 30, max_pixels=Image.MAX_IMAGE_PIXELS or 1 << 62,  # None lifts PIL's limit
                   timeout_s=30.0, local_dir="/", allow_private=True, formats=None)


def describe(ref: str) -> str:
    """``ref`` as messages name it: as it is, or its first characters and its length when long."""
    ref = str(ref).strip()
    if len(ref) <= _SHOWN:
        return ref
    return f"{ref[:_SHOWN - 24]}... ({len(ref):,} characters)"


def local_path(ref: str) -> str | None:
    """The file a plain path or file:// reference names (not resolved, not checked against any
    limits), or None for a URL of another kind or raw base64.

    Raises:
      InputError: a file:// URL that names another host.
    """
    ref = ref.strip()
    scheme = _scheme(ref)
    if scheme == "file":
        parts = urllib.parse.urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"image URL {describe(ref)} names the host {parts.netloc!r}; a file URL must name a "
                             f"local file, file:///absolute/path.")
        return urllib.request.url2pathname(parts.path)
    if scheme is None and not looks_like_base64(ref):
        return ref
    return None


def load_image(ref: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """A reference (a path, file://, http(s) or data: URL, or raw base64; the module docstring says how
    each is told apart and read) -> a fully decoded RGB PIL image.

    Raises:
      InputError: one sentence naming ``ref`` for anything refused or unreadable: an empty reference, an
        unsupported scheme, a malformed data URL or base64, a fetch that is off, refused (an address that
        is not public, too many redirects), unreachable, slow or answered with an error status, a local
        file that is refused (none allowed, or outside ``local_dir``), missing or unreadable, bytes over
        ``max_bytes``, not an image of ``formats``, over ``max_pixels``, truncated or corrupt.
    """
    if not isinstance(ref, str):
        raise InputError(f"an image reference must be a string (a path, an http(s) URL, a data: URL or base64), "
                         f"got {type(ref).__name__}.")
    ref = ref.strip()
    if not ref:
        raise InputError("the image reference is empty; give a path, an http(s) URL, a data: URL or base64.")
    label = describe(ref)
    scheme = _scheme(ref)
    if scheme == "data":
        return _decode(_data_url(ref, label, limits), f"data URL {label}", limits)
    if scheme in ("http", "https"):
        return _decode(_fetch(ref, label, limits), f"from {label}", limits)
    if scheme is None and looks_like_base64(ref) and not _names_a_file(ref, limits):
        try:
            data = _b64decode(ref, limits, lambda why: (
                f"image {label} was read as raw base64 (no scheme, only base64 characters) but {why}; a file "
                f"path that looks like base64 can be written ./PATH or file:///absolute/path."))
        except InputError:
            if "/" not in ref:
                raise
            data = None  # not base64 after all: a path that does not exist, said as such below
        if data is not None:
            try:
                return _decode(data, f"(base64) {label}", limits)
            except InputError:
                if "/" not in ref:
                    raise
                raise InputError(f"image {label} names no file (nothing exists there), and read as base64 it is "
                                 f"not an image; check the path, or send the image as a data: URL.") from None
    if scheme is not None and scheme != "file":
        kinds = [*(["http(s)://"] if limits.allow_fetch else []), "data: (or raw base64)",
                 *(["file://", "a plain path"] if limits.local_dir is not None else [])]
        use = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        raise InputError(f"image reference {label} has the scheme {scheme!r}, which is not supported; use {use}.")
    path = local_path(ref) or ref  # (None for a base64-looking path that does not exist)
    return _decode(_read_file(path, label, limits), label, limits)


def _names_a_file(ref: str, limits: ImageLimits) -> bool:
    """Whether the path `ref` names something, where local files are read at all (`_under_local_dir`)."""
    return limits.local_dir is not None and os.path.lexists(_under_local_dir(ref, limits)[1])


def _under_local_dir(path: str, limits: ImageLimits) -> tuple[str, str]:
    """(the resolved `local_dir`, `path` as local files are read: a relative one starting at `local_dir`,
    or at the current directory where that is "/"; an absolute one as it is)."""
    root = os.path.realpath(limits.local_dir)
    return root, path if root == os.sep else os.path.join(root, path)


def _scheme(ref: str) -> str | None:
    """'data', 'http', 'file', ... for a URL (``data:`` or ``scheme://``), else None (a path or base64)."""
    if ref[:5].lower() == "data:":
        return "data"
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://", ref)
    return m.group(1).lower() if m else None


def is_url(ref: str) -> bool:
    """Whether ``ref`` is a URL other than a ``file://`` one (``data:``, ``http(s)://``, ...)."""
    return _scheme(ref) not in (None, "file")


def looks_like_base64(ref: str) -> bool:
    """Whether ``ref`` could be raw base64 (long enough, of base64's characters alone)."""
    return len(ref) >= _MIN_RAW_BASE64 and _BASE64.fullmatch(ref) is not None


def _b64decode(text: str, limits: ImageLimits, message) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, whitespace ignored) within ``max_bytes``; ``message``
    turns the reason into the error's sentence."""
    text = "".join(text.split())
    if len(text) // 4 * 3 > limits.max_bytes + 2:
        raise InputError(message(f"it holds about {len(text) // 4 * 3:,} bytes, over the limit of "
                                 f"{limits.max_bytes:,}; send a smaller image"))
    try:
        data = base64.b64decode(text.translate(str.maketrans("-_", "+/")), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(message("it is not valid base64 (characters outside its alphabet, or missing padding)")) from None
    if len(data) > limits.max_bytes:
        raise InputError(message(f"it holds {len(data):,} bytes, over the limit of {limits.max_bytes:,}; "
                                 f"send a smaller image"))
    return data


def _data_url(ref: str, label: str, limits: ImageLimits) -> bytes:
    header, comma, payload = ref[5:].partition(",")
    if not comma:
        raise InputError(f"image data URL {label} has no comma before its data; write "
                         f"data:image/png;base64,<base64 of the image>.")
    params = [p.strip() for p in header.split(";")]
    encoded = params[-1].lower() == "base64"
    media = params[0].lower()
    if media and not media.startswith("image/") and media != "application/octet-stream":
        raise InputError(f"image data URL {label} declares the media type {media!r}, not an image; send "
                         f"data:image/png;base64,... (or jpeg, webp, gif).")
    if encoded:
        return _b64decode(payload, limits, lambda why: f"image data URL {label} is refused: {why}.")
    if looks_like_base64(payload):  # (percent-encoded binary bytes hold a %; only a text format such as PPM's need not)
        raise InputError(f"image data URL {label} holds base64 but does not say so; write "
                         f"data:{media or 'image/png'};base64,<base64 of the image>.")
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limits.max_bytes:
        raise InputError(f"image data URL {label} holds {len(data):,} bytes, over the limit of "
                         f"{limits.max_bytes:,}; send a smaller image.")
    return data


# ------------------------------------------------------------------------------------------ local files
def _read_file(path: str, label: str, limits: ImageLimits) -> bytes:
    if "\0" in path:
        raise InputError(f"image path {label} contains a NUL character; no file has such a name.")
    if limits.local_dir is None:
        send = "a base64 data: URL" + (" or an http(s) URL" if limits.allow_fetch else "")
        if _scheme(label) == "file":
            raise InputError(f"image URL {label} names a local file, and local files are not accepted here; send the "
                             f"image as {send}.")
        raise InputError(f"image reference {label} is not a data: URL, an http(s) URL or base64 (of at least "
                         f"{_MIN_RAW_BASE64} characters), and local files are not accepted here; send the image as "
                         f"{send}.")
    relative = not os.path.isabs(path)
    root, path = _under_local_dir(path, limits)
    resolved = os.path.realpath(path)
    if os.path.commonpath([root, resolved]) != root:
        # The folder itself is not named: a server's clients need not learn its layout.
        raise InputError(f"image path {label} is refused: it lies outside the folder of images allowed here "
                         f"(after resolving links and '..').")
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        where = " (a relative path starts at the folder of images allowed here)" if relative and root != os.sep else ""
        raise InputError(f"image file {label} does not exist{where}; check the path.") from None
    except OSError as exc:
        raise InputError(f"cannot read image file {label} ({exc.strerror or one_line(exc)}); check the file "
                         f"and its permissions.") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{label} is a folder, not an image file; pass the path of an image file.")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"image path {label} is not a regular file (a device, pipe or socket); pass an image file.")
    if info.st_size == 0:
        raise InputError(f"image file {label} is empty (0 bytes); pass a complete image file.")
    if info.st_size > limits.max_bytes:
        raise InputError(f"image file {label} has {info.st_size:,} bytes, over the limit of {limits.max_bytes:,}; "
                         f"downscale or recompress it.")
    try:
        with open(resolved, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read image file {label} ({exc.strerror or one_line(exc)}); check the file "
                         f"and its permissions.") from None
    if len(data) > limits.max_bytes:  # it grew since stat
        raise InputError(f"image file {label} has more than {limits.max_bytes:,} bytes (the limit); downscale or "
                         f"recompress it.")
    return data


# ------------------------------------------------------------------------------------------ http(s)
class _Refused(Exception):
    """A fetch step's failure, as the end of a sentence that starts with the URL."""


def _fetch(url: str, label: str, limits: ImageLimits) -> bytes:
    if not limits.allow_fetch:
        raise InputError(f"image URL {label} was not fetched: fetching images over http(s) is turned off here; "
                         f"send the image as a data: URL or base64 instead.")
    deadline = time.monotonic() + limits.timeout_s
    current = url
    try:
        for _ in range(limits.max_redirects + 1):  # the first request, then one per redirect
            status, reason, location, body = _get(current, deadline, limits)
            if status not in _REDIRECTS:
                if status != 200:
                    raise _Refused(f"answered HTTP {status} {reason}".rstrip() + "; check the URL")
                return body
            if not location:
                raise _Refused(f"answered a redirect (HTTP {status}) without a Location")
            target = urllib.parse.urljoin(current, location)
            if _scheme(target) not in ("http", "https"):
                raise _Refused(f"redirects to {describe(target)}, which is not an http(s) URL")
            current = target
    except _Refused as exc:
        via = "" if current == url else f"redirects to {describe(current)}, which "
        raise InputError(f"image URL {label} {via}{exc}.") from None
    except TimeoutError:
        raise InputError(f"image URL {label} did not arrive within {limits.timeout_s:g} s (the time limit); the "
                         f"server is slow or unreachable, so try again or send the image as a data: URL.") from None
    raise InputError(f"image URL {label} redirects more than {limits.max_redirects} time"
                     f"{'s' if limits.max_redirects != 1 else ''} (the limit); give the final URL.")


def _get(url: str, deadline: float, limits: ImageLimits):
    """One GET of ``url`` to a checked address -> (status, reason, Location, body: None unless 200).
    Raises _Refused (its text follows "image URL X ") or TimeoutError."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise _Refused(f"is not a valid URL ({one_line(exc)})") from None
    if not host:
        raise _Refused("names no host")
    addresses = _resolve(host, port, deadline)
    if not limits.allow_private:
        for address in addresses:
            if not _public(address):
                where = f"its address {address} is" if address == host else f"its host {host} resolves to {address},"
                raise _Refused(f"was refused: {where} not a public address (private, loopback, link-local, multicast "
                               f"or reserved); only public addresses are fetched")

    def connect(_address, timeout, source_address=None):
        # http.client's hook for opening the socket: the checked addresses, never a fresh lookup.
        error = None
        for address in addresses:
            try:
                return socket.create_connection((address, port), _remaining(deadline), source_address)
            except TimeoutError:
                raise
            except OSError as exc:
                error = exc
        raise error

    if parts.scheme.lower() == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=_remaining(deadline),
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=_remaining(deadline))
    conn._create_connection = connect
    target = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    try:
        conn.connect()
        sock = conn.sock  # kept: http.client drops conn.sock once the response owns the connection
        conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "vl2-jax"})
        sock.settimeout(_remaining(deadline))
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            return response.status, response.reason, response.getheader("Location"), None
        if response.status != 200:
            return response.status, response.reason, None, None
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > limits.max_bytes:
            raise _Refused(f"sends {int(length):,} bytes, over the limit of {limits.max_bytes:,}; send a "
                           f"smaller image")
        chunks, total = [], 0
        while not response.isclosed():  # it closes its socket once the body has been read
            sock.settimeout(_remaining(deadline))
            chunk = response.read(min(_CHUNK, limits.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limits.max_bytes:
                raise _Refused(f"sends more than {limits.max_bytes:,} bytes (the limit); send a smaller image")
        return 200, response.reason, None, b"".join(chunks)
    except (TimeoutError, _Refused):
        raise
    except ssl.SSLError as exc:
        raise _Refused(f"could not be reached: the TLS connection to {host} failed ({one_line(exc)})") from None
    except http.client.HTTPException as exc:
        raise _Refused(f"answered with a broken HTTP response ({type(exc).__name__}: {one_line(exc)})") from None
    except OSError as exc:
        raise _Refused(f"could not be reached: this machine could not connect to {host} port {port} "
                       f"({exc.strerror or one_line(exc)}); check the URL and the network") from None
    finally:
        conn.close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _resolve(host: str, port: int, deadline: float) -> list[str]:
    """The addresses of ``host``, looked up in a daemon thread so the time limit covers DNS (which has
    no timeout of its own)."""
    found: dict = {}

    def lookup():
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            found["error"] = exc

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if thread.is_alive():
        raise TimeoutError
    if "error" in found:
        error = found["error"]
        why = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
        raise _Refused(f"could not be reached: this machine could not resolve the host {host} ({why}); check the "
                       f"URL and the network (offline?)")
    addresses = list(dict.fromkeys(info[4][0] for info in found["infos"]))
    if not addresses:
        raise _Refused(f"could not be reached: the host {host} has no address")
    return addresses


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global excludes private, loopback, link-local, reserved, shared and unspecified ranges, but
    # counts global multicast.
    return ip.is_global and not ip.is_multicast


# ------------------------------------------------------------------------------------------ decoding
def _decode(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    """Encoded bytes -> a fully decoded RGB image; ``label`` names the image after "image "."""
    if not data:
        raise InputError(f"image {label} is empty (0 bytes); send a complete image.")
    try:
        with without_bomb_warning():  # (PIL warns between 1x and 2x its limit; max_pixels decides below)
            opened = Image.open(io.BytesIO(data), formats=limits.formats)
    except Image.DecompressionBombError as exc:
        raise InputError(_too_many_pixels(label, exc, limits)) from None
    except Image.UnidentifiedImageError:
        kinds = "an image file PIL can read" if limits.formats is None else f"an image in {', '.join(limits.formats)}"
        raise InputError(f"image {label} is not {kinds}; convert it to PNG or JPEG.") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed header raises SyntaxError, ValueError, ...
        raise InputError(f"image {label} is corrupt ({one_line(exc)}); re-save or re-download it.") from None
    with opened:
        width, height = opened.size
        if width < 1 or height < 1:
            raise InputError(f"image {label} has zero area ({width}x{height} pixels); send an image at least 1 "
                             f"pixel wide and high.")
        if width * height > limits.max_pixels:
            raise InputError(f"image {label} is {width}x{height} = {width * height:,} pixels, over the limit of "
                             f"{limits.max_pixels:,}; downscale it first.")
        try:
            opened.load()  # a truncated or corrupt image often fails only here
            return opened.convert("RGB")
        except MemoryError:
            raise
        except Image.DecompressionBombError as exc:  # a later frame or tile over PIL's limit
            raise InputError(_too_many_pixels(label, exc, limits)) from None
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
            raise InputError(f"image {label} could not be decoded ({one_line(exc)}); it is truncated or corrupt, "
                             f"so re-save or re-download it.") from None


@contextlib.contextmanager
def without_bomb_warning():
    """A context that hides PIL's DecompressionBombWarning (the caller refuses such images itself), on
    the main thread only: `warnings.catch_warnings` swaps the process's filters, which threads opening
    images side by side (a server's) would restore out of order; there the warning stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _too_many_pixels(label: str, exc: Exception, limits: ImageLimits) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
    limit = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    which = "PIL's decompression-bomb limit" if limit == Image.MAX_IMAGE_PIXELS else "the limit"
    return f"image {label} has {count}, over {which} of {limit:,}; downscale it first."
