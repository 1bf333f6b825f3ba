"""A checkpoint folder on any fsspec filesystem, so local disk, memory://, s3:// and gs:// read the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
from fsspec import AbstractFileSystem


@dataclass(frozen=True)
class Folder:
    url: str  # local path or fsspec URL of the folder
    fs: AbstractFileSystem = field(init=False, repr=False, compare=False)
    root: str = field(init=False, repr=False, compare=False)  # the folder's path inside fs

    def __post_init__(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url)
        object.__setattr__(self, "fs", fs)
        object.__setattr__(self, "root", root.rstrip("/"))

    def path(self, name: str) -> str:
        """The file's URL, for error messages."""
        return f"{self.url.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.root}/{name}")

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{name}")

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(f"{self.root}/{name}", data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))
