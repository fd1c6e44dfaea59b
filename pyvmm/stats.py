"""Reader for KVM's binary stats fd (KVM_GET_STATS_FD): names and offsets are read once, the
values with one pread per call."""

from __future__ import annotations

import os
import struct

from ._ffi import ffi

_HEADER = "struct kvm_stats_header"
_DESC_FIXED = ffi.sizeof("struct kvm_stats_desc")
_TYPE_MASK = 0xF
_HIST_TYPES = (3, 4)  # linear and log histograms


class StatsReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self._parse(fd)
        except BaseException:
            os.close(fd)  # the reader owns the fd from the start
            self.fd = -1
            raise

    def _parse(self, fd: int) -> None:
        raw = os.pread(fd, ffi.sizeof(_HEADER), 0)
        header = ffi.new(f"{_HEADER} *")
        ffi.memmove(header, raw, len(raw))
        self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0")[0].decode()
        desc_size = _DESC_FIXED + header.name_size
        blob = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
        self.data_offset = header.data_offset
        self.fields: list[tuple[str, int, int, bool]] = []  # name, offset (u64 words), size, hist
        end = 0
        for i in range(header.num_desc):
            base = i * desc_size
            flags, _exponent, size, offset, _bucket = struct.unpack_from("<IhHII", blob, base)
            name = blob[base + _DESC_FIXED: base + desc_size].split(b"\0")[0].decode()
            self.fields.append((name, offset // 8, size, (flags & _TYPE_MASK) in _HIST_TYPES))
            end = max(end, offset + 8 * size)
        self.data_size = end

    def read(self, histograms: bool = False) -> dict:
        raw = os.pread(self.fd, self.data_size, self.data_offset)
        words = struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])
        out: dict = {}
        for name, word, size, hist in self.fields:
            if size == 1 and not hist:
                out[name] = words[word]
            elif histograms:
                out[name] = list(words[word: word + size])
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
