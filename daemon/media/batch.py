"""A batch's pixels, written straight into one tensor on the model's device.

On the CPU the patches of every image are written into the batch's tensor in place (no per-image
float tensors, no concatenation). On an accelerator the uint8 frames travel instead of float pixels
(a sixteenth of the official processor's float32 bytes for an image): they are copied into one
pinned host buffer, sent with one non-blocking copy, and normalised and laid out in patches by the
device. torch's pinned-memory allocator keeps that buffer from being reused until its copy is done.

On the CPU the batch's tensor is one reused buffer (up to `reuse_bytes`): a fresh one of tens of
megabytes is a fresh mapping each time, and its page faults cost more than writing the patches.
A written batch is valid until the next `write`; the model thread collates and runs one batch at a
time, so a forward never sees a buffer being rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .pixels import PatchLayout, Pixels


@dataclass
class PixelWriter:
    layout: PatchLayout
    device: Any  # torch.device
    dtype: Any  # the model's dtype: pixels are cast to it, as the model's own input handling would
    reuse_bytes: int = 256 * 1024 * 1024  # the largest CPU batch buffer kept between batches
    _buffers: dict = field(default_factory=dict, repr=False)  # dtype -> the reused CPU buffer

    def write(self, *groups: list[Pixels]) -> list[tuple[Any, Any]]:
        """For each group (a batch's images, its videos) its pixel rows in the model's dtype and
        its grid_thw, on the device; the groups' rows are slices of one tensor."""
        import torch

        parts = [p for group in groups for p in group]
        grids = [torch.tensor([p.grid for p in group], dtype=torch.int64) for group in groups]
        if self.device.type == "cpu":
            rows = self.layout.written(parts, self.device, self._buffer(torch.float32, parts))
            if self.dtype != torch.float32:
                rows = self._buffer(self.dtype, parts).view(rows.shape).copy_(rows)
        else:
            rows = self.layout.written(self._on_device(parts), self.device)
            rows = rows if rows.dtype == self.dtype else rows.to(self.dtype)
            cuda = self.device.type == "cuda"
            grids = [g.pin_memory().to(self.device, non_blocking=True) if cuda else g.to(self.device) for g in grids]
        out, at = [], 0
        for group, grid in zip(groups, grids):
            count = sum(p.patches for p in group)
            out.append((rows[at:at + count], grid))
            at += count
        return out

    def _buffer(self, dtype, parts: list[Pixels]):
        """A CPU tensor for the parts' pixel rows in `dtype`: the kept one when it is large enough."""
        import torch

        need = sum(p.patches for p in parts) * self.layout.width
        kept = self._buffers.get(dtype)
        if kept is not None and kept.numel() >= need:
            return kept[:need]
        fresh = torch.empty(need, dtype=dtype)
        if need * fresh.element_size() <= self.reuse_bytes:
            self._buffers[dtype] = fresh
        return fresh

    def _on_device(self, parts: list[Pixels]) -> list[Pixels]:
        """The parts with their frames on the device: the uint8 ones through one staging buffer."""
        import torch

        cuda = self.device.type == "cuda"
        small = [p for p in parts if p.data.dtype == torch.uint8]
        staged = torch.empty(sum(p.nbytes for p in small), dtype=torch.uint8, pin_memory=cuda)
        at = 0
        for part in small:  # the bytes as they are: laid out in patches on the device
            staged[at:at + part.nbytes].view(part.data.shape).copy_(part.data)
            at += part.nbytes
        sent = staged.to(self.device, non_blocking=cuda)
        out, at = [], 0
        for part in parts:
            if part.data.dtype == torch.uint8:
                data = sent[at:at + part.nbytes].view(part.data.shape)
                at += part.nbytes
            else:
                data = part.data.to(self.device)
            out.append(Pixels(data, part.grid, part.channels_last))
        return out
