"""Weights as one flat buffer: packing on the learner, loading on the workers, and the versioned message
that crosses the object store.

`FlatParams` makes every parameter of a model a view into one contiguous tensor, so publishing the
weights is a single copy of that tensor (no per-tensor work) and loading them is a single `copy_`.
The learner returns a `WeightsMessage` from a remote call: Ray puts it in the object store once per
version, however many workers read it, and numpy buffers are read there without a copy.

The checksum is built to run at memory speed (zlib's crc32 manages about 4 GB/s on one core, slower
than the object store's own copy): the buffer is cut into 512-byte blocks of 64 words of 64 bits; the
checksum is the crc32 of every block's wrapping sum followed by the wrapping sum of each of the 64 word
columns (and the bytes of a last partial block). Any change to one word changes its block's sum, and
any two different words swapped change a block sum (different blocks) or a column sum (same block).
Packing copies and checksums one cache-sized chunk at a time, so the checksum reads the copy from cache.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch


class WeightsError(ValueError):
    """A weights message does not fit the model or fails its checksum."""


@dataclass(frozen=True)
class WeightsMessage:
    """All parameters of one policy version.

    buffer:   (N,) float32, every parameter flattened and concatenated in `manifest` order
    manifest: ((name, shape, offset), ...) with offsets in elements
    version:  policy version (number of learner updates)
    checksum: `checksum(buffer)`, a crc32 of the buffer's block and column sums
    """

    version: int
    buffer: np.ndarray
    manifest: tuple[tuple[str, tuple[int, ...], int], ...]
    checksum: int

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


BLOCK_WORDS = 64  # 64-bit words per checksum block (512 bytes)
CHUNK_BYTES = 1 << 20  # bytes copied and checksummed at a time when packing (a multiple of the block)


class _Checksum:
    """The checksum of a byte string fed in order, in pieces whose lengths are multiples of 512 bytes."""

    def __init__(self) -> None:
        self.crc = 0
        self.columns = np.zeros(BLOCK_WORDS, dtype=np.uint64)

    def update(self, piece: np.ndarray) -> None:
        blocks = piece.view(np.uint64).reshape(-1, BLOCK_WORDS)
        self.crc = zlib.crc32(np.add.reduce(blocks, axis=1), self.crc)  # unsigned sums wrap around
        self.columns += np.add.reduce(blocks, axis=0)

    def finish(self, tail: np.ndarray) -> int:
        return zlib.crc32(tail, zlib.crc32(self.columns, self.crc))


def checksum(buffer: np.ndarray) -> int:
    """The weights checksum of a contiguous buffer (see the module docstring)."""
    data = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
    full = len(data) - len(data) % (8 * BLOCK_WORDS)
    c = _Checksum()
    if full:
        c.update(data[:full])
    return c.finish(data[full:])


class FlatParams:
    """Rebinds a model's parameters as views into one flat tensor (all parameters share one dtype)."""

    def __init__(self, model: torch.nn.Module) -> None:
        params = list(model.named_parameters())
        dtypes = {p.dtype for _, p in params}
        assert len(dtypes) == 1, f"FlatParams needs one parameter dtype, got {dtypes}"
        device = params[0][1].device
        total = sum(p.numel() for _, p in params)
        self.flat = torch.empty(total, dtype=params[0][1].dtype, device=device)
        manifest, offset = [], 0
        with torch.no_grad():
            for name, p in params:
                n = p.numel()
                view = self.flat[offset : offset + n]
                view.copy_(p.reshape(-1))
                p.data = view.view_as(p)
                manifest.append((name, tuple(p.shape), offset))
                offset += n
        self.manifest = tuple(manifest)

    def pack(self, version: int) -> WeightsMessage:
        """The current parameters as a message (one device-to-host copy, in float32)."""
        if self.flat.device.type != "cpu" or self.flat.dtype != torch.float32:
            buf = self.flat.detach().to("cpu", torch.float32, copy=True).numpy()
            return WeightsMessage(version=version, buffer=buf, manifest=self.manifest, checksum=checksum(buf))
        # on the CPU: copy a chunk, checksum it while it is in cache, next chunk
        src = self.flat.detach().numpy().view(np.uint8)
        buf = np.empty(self.flat.numel(), dtype=np.float32)
        dst = buf.view(np.uint8)
        full = len(src) - len(src) % (8 * BLOCK_WORDS)
        c = _Checksum()
        for start in range(0, full, CHUNK_BYTES):
            end = min(start + CHUNK_BYTES, full)
            np.copyto(dst[start:end], src[start:end])
            c.update(dst[start:end])
        dst[full:] = src[full:]
        return WeightsMessage(version=version, buffer=buf, manifest=self.manifest, checksum=c.finish(dst[full:]))

    def load(self, msg: WeightsMessage, verify: bool = True) -> None:
        """Copy a message into the parameters (one copy), after checking manifest and checksum."""
        if msg.manifest != self.manifest:
            mine = {n: s for n, s, _ in self.manifest}
            theirs = {n: s for n, s, _ in msg.manifest}
            diff = sorted(set(mine.items()) ^ set(theirs.items()))
            raise WeightsError(f"weights v{msg.version} do not fit this model; first difference: {diff[:1]}")
        if verify and checksum(msg.buffer) != msg.checksum:
            raise WeightsError(f"weights v{msg.version}: checksum mismatch (corrupted in transit)")
        # The buffer may be a read-only view of the object store: wrap without copying, copy once into place.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            src = torch.frombuffer(msg.buffer, dtype=torch.float32)
        with torch.no_grad():
            self.flat.copy_(src)
