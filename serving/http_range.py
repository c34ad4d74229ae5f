"""HTTP Range requests (RFC 9110 section 14) on stored files: a video player seeks without downloading everything.

One range per request (`bytes=START-END`, `bytes=START-`, `bytes=-SUFFIX`), which is what players send; a header
this does not understand is ignored and the whole file is sent (as the RFC allows), one that asks for bytes past
the end gets 416 with the file's size.
"""

from __future__ import annotations

import re

from fastapi.responses import Response, StreamingResponse

from .storage import Storage

_SINGLE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable: the file holds {size} bytes")
        self.size = size


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, that a Range header asks for; None for the whole file."""
    if header is None:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        return None  # several ranges, another unit, or garbage: serve the whole file
    first_text, last_text = match.groups()
    if first_text == "":  # the last N bytes
        suffix = int(last_text)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(size)
    return first, last


def file_response(storage: Storage, key: str, size: int, media_type: str, filename: str, range_header: str | None):
    """The file at key, whole (200) or the requested range (206), or 416 for a range past its end."""
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{filename}"'}
    try:
        wanted = byte_range(range_header, size)
    except RangeNotSatisfiable as error:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{error.size}"})
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(storage.chunks(key), media_type=media_type, headers=headers)
    first, last = wanted
    headers |= {"Content-Length": str(last - first + 1), "Content-Range": f"bytes {first}-{last}/{size}"}
    return StreamingResponse(
        storage.chunks(key, first, last - first + 1), status_code=206, media_type=media_type, headers=headers
    )
