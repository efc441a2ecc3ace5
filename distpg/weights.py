"""Weights as one flat buffer: packing on the learner, loading on the workers, and the versioned message
that crosses the object store.

`FlatParams` makes every parameter of a model a view into one contiguous tensor, so publishing the
weights is a single copy of that tensor (no per-tensor work) and loading them is at most a single `copy_`.
The learner returns a `WeightsMessage` from a remote call: Ray puts it in the object store once per
version, however many workers read it, and numpy buffers are read there without a copy.

The checksum is built to run at memory speed (zlib's crc32 manages about 4 GB/s on one core, slower
than the object store's own copy): the buffer is cut into 512-byte blocks of 64 words of 64 bits; the
checksum is the crc32 of every block's wrapping sum followed by the wrapping sum of each of the 64 word
columns (and the bytes of a last partial block). Any change to one word changes its block's sum, and
any two different words swapped change a block sum (different blocks) or a column sum (same block).
Packing copies and checksums one cache-sized chunk at a time, so the checksum reads the copy from cache.

A rollout worker on the CPU loads without a copy (`load(msg, share=True)`): its parameters become views
of the message's buffer, on a Ray worker the object store's shared memory, and it holds the message
until the next version so that the store keeps the bytes (Ray pins an object while a zero-copy array of
it is alive, even after its owner dropped the reference). A model on a GPU copies the buffer to the
device (unavoidable). Every load checks the manifest and the buffer's size. A worker re-reads the
checksum (a full pass over the buffer) only where the bytes may differ from what the learner wrote:
when the message was packed on another Ray node (it crossed the network) or outside Ray
(`packed_elsewhere`). On the learner's own node a worker maps the very bytes the learner checksummed;
what it no longer detects there is a change to that shared memory after publication (a memory fault,
or a process writing into the object store).
"""

from __future__ import annotations

import sys
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
    node:     the Ray node id where it was packed (None outside Ray): a reader on the same node skips the
              checksum pass (see the module docstring)
    """

    version: int
    buffer: np.ndarray
    manifest: tuple[tuple[str, tuple[int, ...], int], ...]
    checksum: int
    node: str | None = None

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


def this_node() -> str | None:
    """The Ray node id of this process, or None when it is not a Ray driver or worker."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not part of a Ray cluster
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def receive(handed: WeightsMessage | list, timeout_s: float) -> WeightsMessage:
    """A weights message handed to a worker: the message itself, or `[ref]`, an object-store reference in a
    list, which Ray passes on unresolved so that the worker fetches it here (and times the fetch)."""
    if isinstance(handed, WeightsMessage):
        return handed
    import ray

    return ray.get(handed[0], timeout=timeout_s)


def packed_elsewhere(msg: WeightsMessage) -> bool:
    """Were `msg`'s bytes possibly changed on their way here? True unless it was packed on this process's
    Ray node (then a reader maps the very bytes the learner checksummed)."""
    return msg.node is None or msg.node != this_node()


def checksum(buffer: np.ndarray) -> int:
    """The weights checksum of a contiguous buffer (see the module docstring)."""
    data = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
    full = len(data) - len(data) % (8 * BLOCK_WORDS)
    c = _Checksum()
    if full:
        c.update(data[:full])
    return c.finish(data[full:])


class FlatParams:
    """Rebinds a model's parameters as views into one flat tensor (all parameters share one dtype).

    `flat` is the model's own buffer, or after `load(msg, share=True)` the message's buffer itself.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for _, p in model.named_parameters()]
        dtypes = {p.dtype for p in self.params}
        assert len(dtypes) == 1, f"FlatParams needs one parameter dtype, got {dtypes}"
        self.numel = sum(p.numel() for p in self.params)
        flat = torch.empty(self.numel, dtype=self.params[0].dtype, device=self.params[0].device)
        manifest, offset = [], 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                flat[offset : offset + p.numel()].copy_(p.reshape(-1))
                manifest.append((name, tuple(p.shape), offset))
                offset += p.numel()
        self.manifest = tuple(manifest)
        # what owns the buffer the parameters view when it is not their own: a message (`load(share=True)`,
        # held so that the object store keeps its bytes) or another FlatParams (`follow`)
        self.held: WeightsMessage | FlatParams | None = None
        self._bind(flat)

    def _bind(self, flat: torch.Tensor) -> None:
        """Make every parameter a view of `flat` at its manifest offset (no copy)."""
        for p, (_, shape, offset) in zip(self.params, self.manifest):
            p.data = flat[offset : offset + p.numel()].view(shape)
        self.flat = flat

    def pack(self, version: int) -> WeightsMessage:
        """The current parameters as a message (one device-to-host copy, in float32)."""
        node = this_node()
        if self.flat.device.type != "cpu" or self.flat.dtype != torch.float32:
            buf = self.flat.detach().to("cpu", torch.float32, copy=True).numpy()
            return WeightsMessage(version, buf, self.manifest, checksum(buf), node)
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
        return WeightsMessage(version, buf, self.manifest, c.finish(dst[full:]), node)

    def check(self, msg: WeightsMessage, verify: bool = True) -> None:
        """Raise WeightsError unless `msg` fits this model (manifest, size, dtype) and, with `verify`, its
        buffer matches its checksum (a full read of the buffer)."""
        if msg.manifest != self.manifest:
            mine = {n: s for n, s, _ in self.manifest}
            theirs = {n: s for n, s, _ in msg.manifest}
            diff = sorted(set(mine.items()) ^ set(theirs.items()))
            raise WeightsError(f"weights v{msg.version} do not fit this model; first difference: {diff[:1]}")
        buf = msg.buffer
        if buf.dtype != np.float32 or buf.ndim != 1 or buf.size != self.numel or not buf.flags.c_contiguous:
            raise WeightsError(f"weights v{msg.version}: buffer of {buf.size} {buf.dtype} values (ndim {buf.ndim}), "
                               f"this model needs {self.numel} contiguous float32 values")
        if verify and checksum(buf) != msg.checksum:
            raise WeightsError(f"weights v{msg.version}: checksum mismatch (corrupted in transit)")

    def load_published(self, msg: WeightsMessage) -> None:
        """Load a message as a rollout worker does: without a copy where possible (`share`), re-reading the
        checksum only if it was packed on another node (`packed_elsewhere`)."""
        self.load(msg, verify=packed_elsewhere(msg), share=True)

    def follow(self, other: FlatParams) -> None:
        """Hold the weights of `other`, the FlatParams of another model of the same shape in this process (a
        colocated rollout worker following its learner): the parameters become views of `other`'s buffer
        where dtype and device match (no copy: they change when `other` changes, so sample only between
        updates), else one converting copy into this model's own buffer."""
        if other.manifest != self.manifest:
            raise WeightsError("the models differ in shape; first parameter: "
                               f"{other.manifest[:1]} vs {self.manifest[:1]}")
        src = other.flat.detach()
        self._take(src, other, share=src.dtype == self.flat.dtype and src.device == self.flat.device)

    def load(self, msg: WeightsMessage, verify: bool = True, share: bool = False) -> None:
        """Make the parameters hold `msg`'s weights, after `check(msg, verify)`.

        share=False: one copy into the model's own buffer (and to its device and dtype). share=True: where
        the model is float32 on the CPU, no copy: the parameters become views of `msg.buffer`, and `msg` is
        held until the next load so that its bytes stay in the object store (elsewhere the copy is needed
        and made). Shared parameters must not be written in place: they are the object store's memory,
        which every worker on the node reads.
        """
        self.check(msg, verify)
        # The buffer may be a read-only view of the object store: wrap it without copying.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            src = torch.frombuffer(msg.buffer, dtype=torch.float32)
        self._take(src, msg, share and self.flat.device.type == "cpu" and self.flat.dtype == torch.float32)

    def _take(self, src: torch.Tensor, owner: WeightsMessage | FlatParams, share: bool) -> None:
        """View `src` (held by `owner`, kept alive in `held`) with share, else copy it into our own buffer."""
        if share:
            self._bind(src)
            self.held = owner
            return
        if self.held is not None:  # the parameters view another buffer: give them their own again
            self._bind(torch.empty_like(self.flat))
            self.held = None
        with torch.no_grad():
            self.flat.copy_(src)
