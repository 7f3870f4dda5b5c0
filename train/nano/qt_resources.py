"""Reading files out of a compiled Qt resource archive (`.rcc`, as made by Qt's `rcc -binary`).

Layout, all integers big-endian:
- header: b"qres", format version, offsets of the node tree, the data block and the name block, and
  (version 3 and later) a flag word saying which compression the archive uses;
- node tree: fixed-size records (14 bytes, 22 from version 2 on, which add a modification time). Each
  starts with its name's offset in the name block and a flag word; a directory then holds its child
  count and the index of its first child (children are contiguous records), a file its locale
  (country, language) and its offset in the data block. Record 0 is the root directory;
- name block: per name, its length in UTF-16 units, a hash, then the UTF-16BE text;
- data block: per file, a 4-byte length then the bytes. A zlib-compressed file's bytes start with the
  uncompressed length (4 bytes) before the zlib stream; zstd-compressed files (Qt 6) are raw frames.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

MAGIC = b"qres"
FLAG_ZLIB = 0x01
FLAG_DIRECTORY = 0x02
FLAG_ZSTD = 0x04


class ResourceError(ValueError):
    pass


class QtResourceArchive:
    """The files of one .rcc archive, by their path inside it ("a/b/c.ogg", no leading slash)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._bytes = self.path.read_bytes()
        if len(self._bytes) < 20 or self._bytes[:4] != MAGIC:
            raise ResourceError(f"{self.path}: not a Qt resource archive")
        self.version, self._tree, self._data, self._names = struct.unpack_from(">4I", self._bytes, 4)
        if self.version not in (1, 2, 3):
            raise ResourceError(f"{self.path}: unsupported rcc format version {self.version}")
        self._node_size = 14 if self.version == 1 else 22
        self._files: dict[str, tuple[int, int]] = {}        # path -> (flags, data offset)
        try:
            self._walk(0, "")
        except (struct.error, UnicodeDecodeError) as e:
            raise ResourceError(f"{self.path}: damaged node tree ({e})") from None

    def _node(self, index: int) -> tuple[int, int, int, int]:
        """Tree record `index`: name offset, flags, then a directory's child count and first child's
        index, or a file's locale and data offset."""
        return struct.unpack_from(">IHII", self._bytes, self._tree + index * self._node_size)

    def _name(self, offset: int) -> str:
        start = self._names + offset
        (length,) = struct.unpack_from(">H", self._bytes, start)
        return self._bytes[start + 6:start + 6 + 2 * length].decode("utf-16-be")

    def _walk(self, index: int, prefix: str) -> None:
        _, _, count, first_child = self._node(index)
        if count and first_child <= index:      # children always follow their directory; else a loop
            raise ResourceError(f"{self.path}: damaged node tree")
        for child in range(first_child, first_child + count):
            # a file's third field packs its locale (country, language), its fourth is its data offset
            name_offset, child_flags, _, data_offset = self._node(child)
            path = prefix + self._name(name_offset)
            if child_flags & FLAG_DIRECTORY:
                self._walk(child, path + "/")
            else:
                self._files[path] = (child_flags, data_offset)

    def names(self) -> list[str]:
        return sorted(self._files)

    def __contains__(self, member: str) -> bool:
        return member in self._files

    def _entry(self, member: str) -> tuple[int, int]:
        try:
            return self._files[member]
        except KeyError:
            raise ResourceError(f"{self.path}: no member {member!r}") from None

    def compression(self, member: str) -> str | None:
        """How the member is stored: "zlib", "zstd" or None (as is)."""
        flags, _ = self._entry(member)
        return "zstd" if flags & FLAG_ZSTD else "zlib" if flags & FLAG_ZLIB else None

    def read(self, member: str) -> bytes:
        flags, offset = self._entry(member)
        start = self._data + offset
        (length,) = struct.unpack_from(">I", self._bytes, start)
        payload = self._bytes[start + 4:start + 4 + length]
        if len(payload) != length:
            raise ResourceError(f"{self.path}: {member} is cut short")
        if flags & FLAG_ZSTD:
            raise ResourceError(f"{self.path}: {member} is zstd-compressed, which this reader does not decode")
        if flags & FLAG_ZLIB:
            (expected,) = struct.unpack_from(">I", payload, 0)
            try:
                payload = zlib.decompress(payload[4:])
            except zlib.error as e:
                raise ResourceError(f"{self.path}: {member} does not inflate ({e})") from None
            if len(payload) != expected:
                raise ResourceError(f"{self.path}: {member} inflated to {len(payload)} bytes, not {expected}")
        return payload
