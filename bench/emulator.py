"""The daemon, unchanged, on an emulated accelerator, with its host path timed stage by stage.

    python -m bench.emulator --log FILE -- serve --embedding-model DIR ...   (the daemon's own CLI)

Before the daemon starts, this process replaces transformers' `Qwen3VLModel.forward` (not the
project's code) with a stand-in that behaves like an H100 running Qwen3-VL-2B in bf16 under eager
transformers: it holds the GIL for `LAUNCH_S` (the Python side of 28 layers launching kernels), then
releases it and sleeps `FIXED_S + PER_TOKEN_S x padded tokens (+ PER_PATCH_S x vision patches)` in
steps, one per decoder layer (the vision tower's blocks first, when there are patches), running the
daemon's pre-layer hooks before each (its preemption), and returns zeros of the right shape. It also wraps the daemon's host-path
functions with timers that record each call's exclusive time (its own, less that of the timed calls it
makes), unless --no-stages. On exit the records are written to FILE (numpy .npz) for `bench.emulated`.

Pixels take the daemon's accelerator path (daemon/inputs/media/batch.py): the host stages each batch's
uint8 frames (real work, timed as "copy"), and the device's part, `PixelWriter._device_rows` (the
copy to the device, normalising and laying out patches, the cast), is emulated like the forward: the
GIL held for `PIXEL_LAUNCH_S` per kernel it would launch, its device time (`PIXEL_BYTES_S` per byte
it would move, + `PIXEL_KERNEL_S` per kernel) added to the next forward's, and an uninitialised
tensor of the right shape returned. Code without that path normalises on the host, as it would on
a GPU.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import threading
import time
from dataclasses import dataclass, field

import numpy as np

LAUNCH_S = 3e-3  # GIL held: 28 layers' kernel launches from Python
FIXED_S = 1e-3  # the shortest forward
PER_TOKEN_S = 8.5e-6  # 2 x 1.7e9 FLOP per token at half of an H100's dense bf16 peak
PER_PATCH_S = 2e-6  # the vision tower, per 16x16 patch
PIXEL_LAUNCH_S = 5e-6  # GIL held per kernel an eager op launches
PIXEL_KERNEL_S = 2e-6  # device time per small kernel
PIXEL_BYTES_S = 1 / 2e12  # device memory traffic, at about 2/3 of an H100's bandwidth
# The 2B model's decoder layers: the device time is spent in this many steps (the vision tower's
# share over its blocks first), with the daemon's pre-layer hooks run before each, as on a GPU where
# the daemon keeps the launches at most a layer or two ahead of the device (models.py).
TEXT_LAYERS, VISION_BLOCKS = 28, 24

DEVICE_STAGE = "device (emulated)"  # timed too, so that no host stage counts it
IDLE_STAGE = "model thread waiting for a batch"
# Host-path stages: (module, class, function) -> stage. Exclusive time, so nesting is counted once.
STAGES = {
    ("daemon.serving.server", "Server", "_read_message"): "receive",
    ("daemon.serving.server", "Server", "_handle"): "parse+admit",
    ("daemon.models", "_QwenVL", "_image"): "decode",  # the processor's path: decode and resize
    ("daemon.inputs.media_reader", "MediaReader", "decode_image"): "decode",
    ("daemon.models", "_QwenVL", "_video_item"): "decode",
    ("daemon.models", "_QwenVL", "_video"): "decode",  # qwen_vl_utils reads and resizes a video's frames
    ("daemon.models", None, "resized_image"): "resize",
    ("qwen_vl_utils", None, "fetch_image"): "resize",  # an image (the processor's path), a video's frame (both)
    ("qwen_vl_utils.vision_process", None, "fetch_image"): "resize",
    ("daemon.models", "_QwenVL", "_rgb_pixels"): "resize",
    ("daemon.inputs.media.pixels", "PatchLayout", "write"): "normalise+patch",
    ("transformers.models.qwen2_vl.image_processing_qwen2_vl", "Qwen2VLImageProcessor", "preprocess"): "normalise+patch",
    ("transformers.models.qwen3_vl.video_processing_qwen3_vl", "Qwen3VLVideoProcessor", "_preprocess"): "normalise+patch",
    ("daemon.models", "_QwenVL", "_process"): "tokenise",
    ("daemon.models", "EmbeddingModel", "prepare"): "tokenise",
    ("daemon.models", "RerankerModel", "prepare"): "tokenise",
    ("daemon.models", "_QwenVL", "prepare_many"): "tokenise",  # (the fast path's ids, the vision path's glue)
    ("daemon.models", "EmbeddingModel", "prepare_many"): "tokenise",
    ("daemon.models", "RerankerModel", "prepare_many"): "tokenise",
    ("daemon.engine.batching", "Scheduler", "put_many"): "schedule",
    ("daemon.engine.batching", "Scheduler", "_take"): "schedule",
    ("daemon.engine.engine", "Engine", "_forward"): "schedule",
    ("daemon.models", "_QwenVL", "_collate"): "collate",
    ("daemon.inputs.media.batch", "PixelWriter", "_stage"): "copy",
    ("daemon.models", "EmbeddingModel", "embed"): "pool+copy",
    ("daemon.models", "RerankerModel", "score"): "pool+copy",
    ("daemon.serving.server", "Server", "_encode"): "reply",
    ("daemon.serving.server", "Server", "_send_finished"): "reply",
}
IDLE_TIMER = {("daemon.engine.batching", "Scheduler", "next_batch"): IDLE_STAGE}
STAGES.update(IDLE_TIMER)


@dataclass
class Recorder:
    """Forwards and stage timings, appended from any thread (list.append is atomic under the GIL)."""

    forwards: list = field(default_factory=list)  # (start, gpu_s, rows, width, patches)
    pending_device_s: list = field(default_factory=lambda: [0.0])  # pixel kernels queued before the next forward
    stages: list = field(default_factory=list)  # (end, stage index, exclusive wall s, exclusive CPU s)
    names: list = field(default_factory=list)
    local: threading.local = field(default_factory=threading.local)

    def timed(self, fn, stage: str):
        if stage not in self.names:
            self.names.append(stage)
        index, local, record = self.names.index(stage), self.local, self.stages.append

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            stack = getattr(local, "stack", None)
            if stack is None:
                stack = local.stack = []
            frame = [0.0, 0.0]  # wall and CPU time spent in timed calls made from this one
            stack.append(frame)
            start, start_cpu = time.monotonic(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                end, end_cpu = time.monotonic(), time.thread_time()
                stack.pop()
                wall, cpu = end - start, end_cpu - start_cpu
                if stack:
                    stack[-1][0] += wall
                    stack[-1][1] += cpu
                record((end, index, wall - frame[0], cpu - frame[1]))

        return wrapper

    def save(self, path: str) -> None:
        np.savez(path, forwards=np.array(self.forwards, dtype=np.float64).reshape(-1, 5),
                 stages=np.array(self.stages, dtype=np.float64).reshape(-1, 4), names=np.array(self.names))


def install(recorder: Recorder, stages: bool = True) -> None:
    import importlib

    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    def forward(self, input_ids=None, pixel_values=None, pixel_values_videos=None, **_kwargs):
        start = time.monotonic()
        rows, width = input_ids.shape
        patches = sum(int(p.shape[0]) for p in (pixel_values, pixel_values_videos) if p is not None)
        gpu_s = FIXED_S + PER_TOKEN_S * rows * width + PER_PATCH_S * patches + recorder.pending_device_s[0]
        recorder.pending_device_s[0] = 0.0
        while time.monotonic() - start < LAUNCH_S:  # holds the GIL, as Python launching kernels does
            pass
        vision_s = PER_PATCH_S * patches
        steps = ([(_first(self, "visual", "blocks"), vision_s / VISION_BLOCKS)] * VISION_BLOCKS if patches else [])
        steps += [(_first(self, "language_model", "layers"), (gpu_s - vision_s) / TEXT_LAYERS)] * TEXT_LAYERS
        began = time.monotonic()
        for layer, layer_s in steps:
            if layer is not None:
                for hook in list(layer._forward_pre_hooks.values()):
                    hook(layer, ())
            began = max(began, time.monotonic()) + layer_s  # a forward run inside the hook took the device meanwhile
            rest = began - time.monotonic()
            if rest > 0:
                time.sleep(rest)
        recorder.forwards.append((start, gpu_s, rows, width, patches))
        return BaseModelOutputWithPast(last_hidden_state=zeros(rows, width, self))

    def zeros(rows: int, width: int, model):
        """A view of one grow-only zero buffer: on a GPU the output stays in device memory, so the host
        must not pay for writing tens of MB of zeros per forward here."""
        hidden = model.config.text_config.hidden_size
        need = rows * width * hidden
        if buffer[0] is None or buffer[0].numel() < need or buffer[0].dtype != model.dtype:
            buffer[0] = torch.zeros(need, dtype=model.dtype)
        return buffer[0][:need].view(rows, width, hidden)

    buffer = [None]

    def _first(model, part: str, layers: str):
        """The first layer of the model's `part` (whose hooks stand for every layer's), if any."""
        found = getattr(getattr(model, part, None), layers, None)
        return found[0] if found else None

    def device_rows(self, staged, parts):
        """The device's part of `PixelWriter`: launches held under the GIL, device time queued."""
        start = time.monotonic()
        kernels = 2 + 3 * len(parts)  # the copy and the cast; per part: subtract, divide, copy a slot
        rows = sum(p.patches for p in parts)
        moved = staged.numel() + rows * self.layout.width * (4 * 3 + 2 * 2)  # float32 written and read, the cast
        while time.monotonic() - start < PIXEL_LAUNCH_S * kernels:
            pass
        recorder.pending_device_s[0] += PIXEL_KERNEL_S * kernels + PIXEL_BYTES_S * moved
        return torch.empty((rows, self.layout.width), dtype=self.dtype)

    modeling_qwen3_vl.Qwen3VLModel.forward = recorder.timed(forward, DEVICE_STAGE)
    writer = getattr(importlib.import_module("daemon.inputs.media.batch"), "PixelWriter", None) \
        if importlib.util.find_spec("daemon.inputs.media") else None
    if writer is not None:
        writer._accelerated = lambda self: True
        writer._device_rows = recorder.timed(device_rows, DEVICE_STAGE)
    # The timers cost the host path microseconds per call: without `stages` only those called once
    # per batch stay (the forward, and the model thread's wait for the next batch).
    for (module, cls, name), stage in STAGES.items() if stages else IDLE_TIMER.items():
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue  # (older code, measured for comparison, may lack a module or a function)
        owner = importlib.import_module(module)
        owner = owner if cls is None else getattr(owner, cls, None)
        found = vars(owner).get(name) if owner is not None else None
        if isinstance(found, staticmethod):
            setattr(owner, name, staticmethod(recorder.timed(found.__func__, stage)))
        elif found is not None:
            setattr(owner, name, recorder.timed(found, stage))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="where to write the records on exit (.npz)")
    parser.add_argument("--no-stages", dest="stages", action="store_false", help="time forwards only")
    parser.add_argument("daemon_args", nargs=argparse.REMAINDER, help="-- then the daemon's arguments")
    args = parser.parse_args()
    daemon_args = args.daemon_args[1:] if args.daemon_args[:1] == ["--"] else args.daemon_args
    import torch

    # The pooling gather and copies that run on the device on a GPU run on the CPU here; one thread
    # keeps torch's OpenMP team from waking (and waiting for) a second core for them.
    torch.set_num_threads(1)
    recorder = Recorder()
    install(recorder, stages=args.stages)
    atexit.register(recorder.save, args.log)
    from daemon.main import cli

    cli(daemon_args, prog_name="qwen3vl-daemon")


if __name__ == "__main__":
    main()
