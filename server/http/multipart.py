"""The upload form: a multipart body -> its text fields and its file parts (files, or one archive)."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from server.errors import UploadRejected
from server.http.problems import ProblemError

MAX_PARTS = 16


async def read_form(request: Request) -> tuple[dict[str, str], list[UploadFile], UploadFile | None]:
    """Parse the multipart body (size is limited by the middleware and the upload's byte budget)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ProblemError(415, "unsupported-media-type", "upload adapters as multipart/form-data (fields: name, files or archive)")
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise ProblemError(400, "bad-multipart", f"cannot parse the multipart body: {exc.message}") from None
    except ClientDisconnect:  # nothing was staged; a 400 (no one reads it) instead of a logged 500
        raise ProblemError(400, "client-disconnect", "the client hung up before the upload's body was complete") from None
    fields: dict[str, str] = {}
    files: list[UploadFile] = []
    archive: UploadFile | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key == "files":
                files.append(value)
            elif key == "archive":
                if archive is not None:
                    raise UploadRejected(422, "bad-upload", "send one `archive` part")
                archive = value
            else:
                raise UploadRejected(422, "bad-upload", f"unexpected file part {key!r}; use `files` or `archive`")
        else:
            fields[key] = value
    if files and archive is not None:
        raise UploadRejected(422, "bad-upload", "send either `files` parts or one `archive` part, not both")
    if not files and archive is None:
        raise UploadRejected(422, "bad-upload", "no adapter files: send `files` parts or one `archive` part")
    return fields, files, archive
