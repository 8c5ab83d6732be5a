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

from daemon.inputs.media.pixels import PatchLayout, Pixels


@dataclass
class PixelWriter:
    layout: PatchLayout
    device: Any  # torch.device
    dtype: Any  # the model's dtype: pixels are cast to it, as the model's own input handling would
    reuse_bytes: int = 64 * 1024 * 1024  # the largest CPU batch buffer kept between batches (13 448x448 images)
    _buffers: dict = field(default_factory=dict, repr=False)  # dtype -> the reused CPU buffer

    def write(self, *groups: list[Pixels], reuse: bool = True) -> list[tuple[Any, Any]]:
        """For each group (a batch's images, its videos) its pixel rows in the model's dtype and
        its grid_thw, on the device; the groups' rows are slices of one tensor. `reuse`: the CPU
        buffer kept between batches may be written (not while another forward may still read it)."""
        import torch

        parts = [p for group in groups for p in group]
        grids = [torch.tensor([p.grid for p in group], dtype=torch.int64) for group in groups]
        if self._accelerated():
            rows = self._device_rows(self._stage(parts), parts)
            cuda = self.device.type == "cuda"
            grids = [g.pin_memory().to(self.device, non_blocking=True) if cuda else g.to(self.device) for g in grids]
        else:
            rows = self.layout.written(parts, self.device, self._buffer(torch.float32, parts, reuse))
            if self.dtype != torch.float32:
                rows = self._buffer(self.dtype, parts, reuse).view(rows.shape).copy_(rows)
        out, at = [], 0
        for group, grid in zip(groups, grids):
            count = sum(p.patches for p in group)
            out.append((rows[at:at + count], grid))
            at += count
        return out

    def _accelerated(self) -> bool:
        return self.device.type != "cpu"

    def _buffer(self, dtype, parts: list[Pixels], reuse: bool = True):
        """A CPU tensor for the parts' pixel rows in `dtype`: the kept one when it is large enough
        (and may be reused), else a new one."""
        import torch

        need = sum(p.patches for p in parts) * self.layout.width
        if not reuse:
            return torch.empty(need, dtype=dtype)
        kept = self._buffers.get(dtype)
        if kept is not None and kept.numel() >= need:
            return kept[:need]
        fresh = torch.empty(need, dtype=dtype)
        if need * fresh.element_size() <= self.reuse_bytes:
            self._buffers[dtype] = fresh
        return fresh

    def _stage(self, parts: list[Pixels]):
        """The host's part of an accelerator's batch: the uint8 parts' bytes, as they are, back to
        back in one (on CUDA pinned) buffer."""
        import torch

        small = [p for p in parts if p.data.dtype == torch.uint8]
        staged = torch.empty(sum(p.nbytes for p in small), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        at = 0
        for part in small:
            staged[at:at + part.nbytes].view(part.data.shape).copy_(part.data)
            at += part.nbytes
        return staged

    def _device_rows(self, staged, parts: list[Pixels]):
        """The device's part: the staged bytes sent in one copy, laid out in patches and normalised
        there (float32, as the processor computes), then cast to the model's dtype."""
        import torch

        sent = staged.to(self.device, non_blocking=self.device.type == "cuda")
        on_device, at = [], 0
        for part in parts:
            if part.data.dtype == torch.uint8:
                data = sent[at:at + part.nbytes].view(part.data.shape)
                at += part.nbytes
            else:
                data = part.data.to(self.device)
            on_device.append(Pixels(data, part.grid, part.channels_last))
        rows = self.layout.written(on_device, self.device)
        return rows if rows.dtype == self.dtype else rows.to(self.dtype)
