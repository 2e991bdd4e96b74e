"""Images in requests: `data:` URLs (and, when allowed, http(s) URLs) -> a checked image file.

The bytes go to a file of the server's temporary folder and through `data_tools.images.load_image`, the
loader training used: the format is read from the content (the MIME type a client states is not
trusted), the size is checked from the header before any pixel is decoded (the decompression-bomb
guard), and the whole image must decode. The file is what the recipes' collators then open.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from data_tools.errors import IMAGE_TOO_LARGE, DataError
from data_tools.images import load_image


class ClientError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _remote_bytes(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """At most `max_bytes` + 1 bytes of the body, read within `timeout` seconds in all (a socket timeout
    bounds each read only, not a server that trickles its bytes)."""
    deadline, data = time.monotonic() + timeout, bytearray()
    try:
        if timeout <= 0:  # (a socket timeout of 0 is no timeout but a non-blocking socket)
            raise TimeoutError
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while len(data) <= max_bytes and (chunk := response.read1(max_bytes + 1 - len(data))):
                data += chunk
                if time.monotonic() > deadline:
                    raise TimeoutError
    except TimeoutError:  # `timeout` is what the request has left: its deadline, as if reached while waiting
        raise ClientError(504, f"the image URL was not read within the {timeout:g} s the request had left",
                          param=param, type_="timeout", code="timeout") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # HTTPException: a malformed response
        raise ClientError(400, f"cannot fetch the image URL: {e}", param=param,
                          code="image_fetch_failed") from e
    if len(data) > max_bytes:
        raise ClientError(413, f"the image at the URL is over {max_bytes:,} bytes", param=param,
                          code="image_too_large")
    return data


def image_bytes(url: str, *, allow_remote: bool, max_bytes: int, timeout: float, param: str) -> bytes:
    """The bytes an `image_url` names: a base64 `data:` URL, or http(s) when `allow_remote`."""
    if not isinstance(url, str) or not url:
        raise ClientError(400, "image_url.url must be a non-empty string", param=param,
                          code="invalid_image_url")
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ClientError(400, "a data: URL must be base64, as data:image/png;base64,<data>", param=param,
                              code="invalid_image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ClientError(400, f"the data: URL is not valid base64: {e}", param=param,
                              code="invalid_image_url") from e
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ClientError(400, "remote image URLs are refused by this server (started without "
                              "--allow-remote-images); send the image as a data: URL", param=param,
                              code="remote_images_disabled")
        return _remote_bytes(url, max_bytes, timeout, param)
    raise ClientError(400, "image_url.url must be a data: URL (or http(s) where the server allows it)",
                      param=param, code="invalid_image_url")


def save_checked_image(data: bytes, folder: str | Path, *, max_pixels: int, param: str) -> str:
    """Write `data` to a new file in `folder` and check it as training checks an image; the file's path.

    Raises ClientError (the file removed) when it is not an image the server takes."""
    fd, path = tempfile.mkstemp(dir=folder, suffix=".img")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        load_image(path, max_pixels=max_pixels).close()
    except DataError as e:  # its message names our temporary file: tell the client what is wrong instead
        os.unlink(path)
        status = 413 if e.reason == IMAGE_TOO_LARGE else 400
        message = e.message.replace(f"'{path}'", "").replace(path, "the upload").replace("  ", " ")
        raise ClientError(status, f"not an image the server takes: {message}", param=param,
                          code=e.reason) from None
    except BaseException:
        os.unlink(path)
        raise
    return path
