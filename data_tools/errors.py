"""The one error type for bad input rows: it names the file, the line, the field and the reason."""

from __future__ import annotations

# Reason codes, used as keys in reject files and summary tables. Every dropped row carries one.
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
BAD_VALUE = "bad_value"
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE_FILE = "empty_image_file"
UNREADABLE_IMAGE = "unreadable_image"
TRUNCATED_IMAGE = "truncated_image"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_TOO_LARGE = "image_too_large"
PATH_OUTSIDE_ROOT = "path_outside_root"
DUPLICATE_KEY = "duplicate_key"
DUPLICATE_ID = "duplicate_id"
MULTIPLE_IMAGES = "multiple_images"
RESERVED_TEXT = "reserved_text"  # a model's special token (`</s>`, `<image>`) written in a text field
# Not a row's reason: the whole file cannot be read (missing, a folder, no permission), or has no rows.
UNREADABLE_FILE = "unreadable_file"
EMPTY_FILE = "empty_file"


class DataError(ValueError):
    """A bad row or image. `str()` reads `file:line: field 'f': message` and says what to do."""

    def __init__(self, reason: str, message: str, *, path=None, line: int | None = None,
                 field: str | None = None):
        self.reason = reason
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message} [{self.reason}]"

    def at(self, *, path=None, line: int | None = None, field: str | None = None) -> "DataError":
        """Fill in where the error happened, keeping what is already known."""
        if path is not None and self.path is None:
            self.path = str(path)
        if line is not None and self.line is None:
            self.line = line
        if field is not None and self.field is None:
            self.field = field
        self.args = (self._format(),)
        return self

    def to_dict(self) -> dict:
        return {"reason": self.reason, "message": self.message, "file": self.path, "line": self.line,
                "field": self.field}
