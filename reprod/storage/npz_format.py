"""The layout both sides of the native format share: an uncompressed zip of .npy members (plain
``numpy.load`` reads it), payloads aligned to 64 bytes for mmap, a JSON metadata member. No pickle
anywhere. ``npz_writer`` writes it, ``npz_reader`` reads it (and plain ``np.savez`` archives)."""

from __future__ import annotations

import struct

__all__ = ["META_NAME", "FORMAT_NAME", "FORMAT_VERSION"]

META_NAME = "__reprod__.json"
FORMAT_NAME = "reprod-npz"
FORMAT_VERSION = 1
_STORED = 0  # zipfile.ZIP_STORED
# the zip end records
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_LOCATOR64 = struct.Struct("<4sLQL")  # zip64 end record locator, 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record, 56 bytes
