"""vl2_jax.images: data URLs, raw base64, http(s) fetches from a local server, local files, limits."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import urllib.parse
import zlib

import numpy as np
import pytest
from PIL import Image

from vl2_jax import images
from vl2_jax.errors import InputError
from vl2_jax.images import ImageLimits, describe, load_image, local_path

LOCAL = ImageLimits(allow_private=True)  # fetches from the test server on 127.0.0.1


def png_bytes(width=13, height=7, mode="RGB", seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, "PNG")
    return out.getvalue()


PNG = png_bytes()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: PIL reads its size without decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def same_pixels(image: Image.Image, data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as reference:
        return np.array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


# ------------------------------------------------------------------------------------------ data: and base64
def test_data_url_round_trip():
    image = load_image(data_url(PNG))
    assert image.mode == "RGB" and image.size == (13, 7) and same_pixels(image, PNG)
    rgba = png_bytes(mode="RGBA")  # converted as processor.open_image does: convert("RGB")
    assert same_pixels(load_image(data_url(rgba, "image/webp")), rgba)  # the declared subtype is not trusted
    urlsafe = "data:;base64," + base64.urlsafe_b64encode(PNG).decode()
    assert same_pixels(load_image(urlsafe), PNG)
    assert same_pixels(load_image("data:image/png," + urllib.parse.quote_from_bytes(PNG)), PNG)  # percent-encoded


def test_a_missing_path_of_base64_characters_is_said_to_name_no_file():
    """A missing file's path can be made of base64's characters alone (no extension): one that mixes the
    standard and URL-safe alphabets is no base64 (it "does not exist"); one of the standard alphabet that
    decodes, but to no image, is said to be neither."""
    folder = "/" + "a" * 64  # (no such folder)
    mixed = f"{folder}/pytest-of-x_y/missing"  # (as pytest's temporary folders are named)
    mixed += "z" * (-len(mixed) % 4)  # (a length that decodes)
    with pytest.raises(InputError, match="does not exist"):
        load_image(mixed, ImageLimits.cli())
    standard = f"{folder}/missing"
    standard += "z" * (-len(standard) % 4)
    with pytest.raises(InputError, match="names no file .nothing exists there., and read as base64 it is not an image"):
        load_image(standard, ImageLimits.cli())


def test_raw_base64_round_trip_line_breaks_allowed():
    text = base64.encodebytes(PNG).decode()  # wrapped at 76 characters, as `base64` prints it
    assert same_pixels(load_image(text), PNG)
    assert local_path(text) is None


@pytest.mark.parametrize("ref,words", [
    ("data:image/png;base64,iVBORw0K!!!", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # missing padding
    ("data:image/png;base64" + "A" * 40, "no comma"),
    ("data:text/html;base64,PGgxPg==", "not an image"),
    ("data:image/png," + base64.b64encode(png_bytes()).decode(), "holds base64 but does not say so"),
])
def test_malformed_data_urls(ref, words):
    with pytest.raises(InputError, match=words) as caught:
        load_image(ref)
    assert describe(ref) in str(caught.value)


def test_bytes_that_are_not_an_image():
    with pytest.raises(InputError, match="is not an image in PNG"):
        load_image(data_url(b"just some text, not an image" * 4))
    with pytest.raises(InputError, match="is not an image"):
        load_image(base64.b64encode(b"\x00" * 300).decode())  # raw base64 of zeros


def test_a_long_data_url_is_shortened_in_messages():
    ref = data_url(b"x" * 30_000)
    with pytest.raises(InputError) as caught:
        load_image(ref)
    message = str(caught.value)
    assert len(message) < 300 and f"({len(ref):,} characters)" in message and message.startswith("image data URL data:")


def test_truncated_image_is_one_error():
    with pytest.raises(InputError, match="could not be decoded"):
        load_image(data_url(PNG[: len(PNG) // 2]))


def test_byte_limit_on_data_urls():
    with pytest.raises(InputError, match="over the limit of 100"):
        load_image(data_url(PNG), ImageLimits(max_bytes=100))


def test_pixel_limit():
    assert load_image(data_url(PNG), ImageLimits(max_pixels=13 * 7)).size == (13, 7)
    with pytest.raises(InputError, match=r"13x7 = 91 pixels, over the limit of 90"):
        load_image(data_url(PNG), ImageLimits(max_pixels=90))
    with pytest.raises(InputError, match=r"10000x5000 = 50,000,000 pixels, over the limit of 40,000,000"):
        load_image(data_url(png_header_only(10_000, 5_000)))  # refused from the header, nothing decoded


def test_pils_decompression_bomb_guard_is_an_input_error():
    bomb = data_url(png_header_only(30_000, 30_000))  # over twice PIL.Image.MAX_IMAGE_PIXELS: PIL raises at open
    with pytest.raises(InputError, match="900,000,000 pixels, over PIL's decompression-bomb limit of"):
        load_image(bomb, ImageLimits(max_pixels=10**12))


def test_an_image_between_once_and_twice_pils_limit_is_one_error_without_pils_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=r"12000x12000 = 144,000,000 pixels, over the limit of 40,000,000"):
            load_image(data_url(png_header_only(12_000, 12_000)))
    assert [str(w.message) for w in caught] == []


def test_unsupported_scheme_and_empty_reference():
    with pytest.raises(InputError, match="scheme 'ftp'"):
        load_image("ftp://example.com/cat.png")
    with pytest.raises(InputError, match="empty"):
        load_image("  ")


def test_formats_are_restricted_unless_none(tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (3, 2)).save(out, "PCX")
    with pytest.raises(InputError, match="not an image in PNG, JPEG"):
        load_image(data_url(out.getvalue()))
    assert load_image(data_url(out.getvalue()), ImageLimits(formats=None)).size == (3, 2)


# ------------------------------------------------------------------------------------------ http(s)
class _Handler(http.server.BaseHTTPRequestHandler):
    release: threading.Event

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, body: bytes, length=True, status=200):
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if self.path == "/cat.png":
            self._send(PNG)
        elif self.path == "/big":
            self._send(b"\x89PNG" + b"\x00" * 5000)
        elif self.path == "/big-streamed":  # no Content-Length: the body ends when the connection closes
            self._send(b"\x89PNG" + b"\x00" * 5000, length=False)
        elif self.path.startswith("/hops/"):
            n = int(self.path.rsplit("/", 1)[1])
            self._redirect(f"/hops/{n - 1}") if n else self._send(PNG)
        elif self.path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path == "/slow":
            self.release.wait(10)
            self._send(PNG)
        else:
            self._send(b"not here", status=404)


@pytest.fixture(scope="module")
def server():
    """A local http server on 127.0.0.1: its base URL."""
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"release": release})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()
    httpd.server_close()


def test_fetch_round_trip(server):
    image = load_image(f"{server}/cat.png", LOCAL)
    assert image.mode == "RGB" and same_pixels(image, PNG)


def test_private_address_refused_by_default(server):
    with pytest.raises(InputError, match="127.0.0.1 is not a public address") as caught:
        load_image(f"{server}/cat.png")
    assert f"{server}/cat.png" in str(caught.value)


def test_hosts_are_checked_by_their_resolved_address(monkeypatch):
    monkeypatch.setattr(images.socket, "getaddrinfo", lambda host, port, **kw: [
        (2, 1, 6, "", ("10.1.2.3", port))])
    with pytest.raises(InputError, match="its host images.example.com resolves to 10.1.2.3, not a public address"):
        load_image("http://images.example.com/cat.png")


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fe80::1", "fc00::1", "ff02::1",
                                     "::ffff:127.0.0.1"])
def test_non_public_addresses(address):
    assert not images._public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address):
    assert images._public(address)


def test_byte_limit_with_and_without_content_length(server):
    with pytest.raises(InputError, match=r"sends 5,004 bytes, over the limit of 1,000"):
        load_image(f"{server}/big", ImageLimits(max_bytes=1000, allow_private=True))
    with pytest.raises(InputError, match=r"sends more than 1,000 bytes"):
        load_image(f"{server}/big-streamed", ImageLimits(max_bytes=1000, allow_private=True))


def test_redirect_limit(server):
    assert same_pixels(load_image(f"{server}/hops/3", LOCAL), PNG)  # three redirects: the default limit
    with pytest.raises(InputError, match="redirects more than 3 times") as caught:
        load_image(f"{server}/hops/4", LOCAL)
    assert f"{server}/hops/4" in str(caught.value)
    with pytest.raises(InputError, match="redirects more than 0 times"):
        load_image(f"{server}/hops/1", ImageLimits(max_redirects=0, allow_private=True))


def test_redirect_to_a_private_address_is_refused(server, monkeypatch):
    """Every hop's address is checked: here the test server counts as public, the redirect's target
    (the cloud metadata address) does not, and nothing connects to it."""
    public = images._public
    monkeypatch.setattr(images, "_public", lambda address: address == "127.0.0.1" or public(address))
    assert same_pixels(load_image(f"{server}/cat.png"), PNG)
    with pytest.raises(InputError, match="redirects to http://169.254.169.254/latest/meta-data/, which was refused: "
                                         "its address 169.254.169.254 is not a public address"):
        load_image(f"{server}/to-metadata")


def test_time_limit(server):
    start = time.monotonic()
    with pytest.raises(InputError, match=r"did not arrive within 0.3 s"):
        load_image(f"{server}/slow", ImageLimits(timeout_s=0.3, allow_private=True))
    assert time.monotonic() - start < 2


def test_https_to_a_plain_http_server_is_a_tls_error(server):
    with pytest.raises(InputError, match="the TLS connection to 127.0.0.1 failed"):
        load_image(server.replace("http://", "https://") + "/cat.png", LOCAL)


def test_error_status(server):
    with pytest.raises(InputError, match="answered HTTP 404"):
        load_image(f"{server}/missing.png", LOCAL)


def test_unreachable_host_names_the_url(monkeypatch):
    import socket

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(images.socket, "getaddrinfo", offline)
    with pytest.raises(InputError, match=r"image URL https://images.example.com/cat.png could not be reached: this "
                                         r"machine could not resolve the host images.example.com"):
        load_image("https://images.example.com/cat.png")


def test_fetch_disabled(server):
    with pytest.raises(InputError, match="fetching images over http\\(s\\) is turned off"):
        load_image(f"{server}/cat.png", ImageLimits(allow_fetch=False, allow_private=True))


# ------------------------------------------------------------------------------------------ local files
@pytest.fixture
def folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "in.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "sub").symlink_to(outside)
    return allowed, outside


def test_local_path_inside_local_dir(folders):
    allowed, _ = folders
    limits = ImageLimits(local_dir=str(allowed))
    assert same_pixels(load_image(str(allowed / "in.png"), limits), PNG)
    assert same_pixels(load_image((allowed / "in.png").as_uri(), limits), PNG)  # file:///...


@pytest.mark.parametrize("name", ["../outside/secret.png", "link.png", "sub/secret.png", "../outside/missing.png"])
def test_local_path_outside_local_dir_is_refused(folders, name):
    allowed, _ = folders
    with pytest.raises(InputError, match="outside the folder of images allowed here"):
        load_image(f"{allowed}/{name}", ImageLimits(local_dir=str(allowed)))


def test_local_files_refused_without_local_dir(folders):
    allowed, _ = folders
    for ref in (str(allowed / "in.png"), (allowed / "in.png").as_uri()):
        with pytest.raises(InputError, match="local files are not accepted here"):
            load_image(ref)


def test_relative_paths_start_at_local_dir_or_at_the_working_directory_for_the_cli(folders, monkeypatch):
    allowed, outside = folders
    monkeypatch.chdir(outside)
    assert same_pixels(load_image("in.png", ImageLimits(local_dir=str(allowed))), PNG)
    with pytest.raises(InputError, match="outside the folder"):
        load_image("../outside/secret.png", ImageLimits(local_dir=str(allowed)))
    assert same_pixels(load_image("secret.png", ImageLimits.cli()), PNG)
    looks_like_base64 = "QUJD" * 16  # (a file name of 64 base64 characters, inside the folder: a path)
    (allowed / looks_like_base64).write_bytes(PNG)
    assert same_pixels(load_image(looks_like_base64, ImageLimits(local_dir=str(allowed))), PNG)
    # a missing relative file says where relative paths start (without naming the folder); the CLI's does not
    with pytest.raises(InputError, match=r"^image file missing.png does not exist \(a relative path starts at the "
                                         r"folder of images allowed here\); check the path.$"):
        load_image("missing.png", ImageLimits(local_dir=str(allowed)))
    with pytest.raises(InputError, match=r"^image file missing.png does not exist; check the path.$"):
        load_image("missing.png", ImageLimits.cli())


@pytest.mark.parametrize("ref", ["aGVsbG8=", "not base64!" * 8])
def test_a_reference_that_is_no_url_and_no_base64_says_so_where_files_are_refused(ref):
    with pytest.raises(InputError, match="is not a data: URL, an http.s. URL or base64"):
        load_image(ref)
    with pytest.raises(InputError, match="names a local file.*as a base64 data: URL or an http.s. URL"):
        load_image("file:///tmp/x.png")
    with pytest.raises(InputError, match=r"as a base64 data: URL\.$"):
        load_image("file:///tmp/x.png", ImageLimits(allow_fetch=False))


def test_cli_limits_read_any_local_file(folders, tmp_path):
    _, outside = folders
    assert same_pixels(load_image(str(outside / "secret.png"), ImageLimits.cli()), PNG)
    with pytest.raises(InputError, match=f"image file {tmp_path}/nope.png does not exist"):
        load_image(str(tmp_path / "nope.png"), ImageLimits.cli())
    with pytest.raises(InputError, match="is a folder"):
        load_image(str(tmp_path), ImageLimits.cli())
    with pytest.raises(InputError, match="names the host"):
        load_image("file://elsewhere/x.png", ImageLimits.cli())


def test_local_path_names_only_files():
    assert local_path("photo.jpg") == "photo.jpg"
    assert local_path("file:///tmp/a%20b.png") == "/tmp/a b.png"
    assert local_path("https://example.com/a.png") is None and local_path(data_url(PNG)) is None
