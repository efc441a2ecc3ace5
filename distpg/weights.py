"""Weights as one flat buffer: packing on the learner, loading on the workers, and the versioned message
that crosses the object store.

`FlatParams` makes every parameter of a model a view into one contiguous tensor, so publishing the
weights is a single copy of that tensor (no per-tensor work) and loading them is a single `copy_`.
The learner returns a `WeightsMessage` from a remote call: Ray puts it in the object store once per
version, however many workers read it, and numpy buffers are read there without a copy.
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
    checksum: crc32 of the buffer's bytes
    """

    version: int
    buffer: np.ndarray
    manifest: tuple[tuple[str, tuple[int, ...], int], ...]
    checksum: int

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


def checksum(buffer: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(buffer)).cast("B"))


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
        buf = self.flat.detach().to("cpu", torch.float32, copy=True).numpy()
        return WeightsMessage(version=version, buffer=buf, manifest=self.manifest, checksum=checksum(buf))

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
