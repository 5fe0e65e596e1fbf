"""Input size limits, shared by the decoders and the console's upload guard."""

from __future__ import annotations

#: Smallest side a head CT slice may have; smaller images carry too little detail.
MIN_SIDE_PX = 64
#: Largest decoded image (pixels): guards against decompression bombs.
MAX_PIXELS = 40_000_000
#: Largest single file accepted (bytes).
MAX_FILE_BYTES = 64 * 1024 * 1024
