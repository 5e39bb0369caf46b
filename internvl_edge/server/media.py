"""Which image (and video) references a server request may use, and reading them.

- `data:image/...;base64,` URLs (`data:video/...;base64,` for a video_url part): always.
- `file://` URLs and plain paths: only with --allowed-local-media-path, and only files under it. The
  path is resolved first (`..`, symlinks, relative paths against the folder), then checked to lie
  under the folder's own resolved path, then opened without following a final symlink and checked to
  be a regular file, so no file outside the folder is ever read. A refusal never says whether the
  outside file exists.
- `http(s)` URLs: refused; the server fetches nothing (the caller can send the bytes as a data URL).
"""

from __future__ import annotations

import os
import stat

from ..errors import UserError
from ..messages import decode_data_url, file_url_path, url_kind


class MediaPolicy:
    def __init__(self, allowed_root: str | None = None, max_bytes: int = 32 << 20):
        self.root = os.path.realpath(allowed_root) if allowed_root else None
        self.max_bytes = max_bytes

    def resolve(self, ref, media: str = "image") -> bytes:
        """An image (`media` "video": a video) reference from a request -> its bytes, or a UserError
        saying why not."""
        example = "data:image/png;base64,..." if media == "image" else "data:video/mp4;base64,..."
        if not isinstance(ref, str):
            raise UserError(f"{'an' if media == 'image' else 'a'} {media} URL must be a string")
        kind = url_kind(ref)
        if kind == "data":
            return decode_data_url(ref, media)
        if kind == "remote":
            raise UserError(f"this server does not fetch http(s) URLs; send the {media} as a data URL ({example})")
        path = file_url_path(ref) if kind == "file" else ref
        if self.root is None:
            raise UserError(
                "local files are not served (start the server with --allowed-local-media-path "
                f"to allow a folder); send the {media} as a data URL"
            )
        return self._read_under_root(path)

    def resolve_video(self, ref) -> bytes:
        return self.resolve(ref, "video")

    def _read_under_root(self, path: str) -> bytes:
        if "\x00" in path:
            raise UserError("the image path is not valid")
        real = os.path.realpath(os.path.join(self.root, path))  # an absolute `path` replaces the root here
        if os.path.commonpath([self.root, real]) != self.root or real == self.root:
            raise UserError("the image path is outside the allowed media folder")
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise UserError(
                f"image not found under the allowed media folder: {os.path.relpath(real, self.root)}"
            ) from None
        except OSError:  # a symlink swapped in after the check (ELOOP), permissions, ...
            raise UserError("the image file cannot be opened") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UserError("the image path is not a regular file")
            if info.st_size > self.max_bytes:
                raise UserError(f"the image file is larger than {self.max_bytes} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(self.max_bytes + 1)
        finally:
            os.close(fd)
