"""The image and video path, from decoded media to the pixel tensors of a batch.

`pixels`: an image or video resized as the official pipeline resizes it, kept as uint8 frames (a
quarter of float32's bytes, an eighth of the official processor's output, which repeats an image's
frame), and the patch layout that turns them into the model's `pixel_values` exactly as the
official processor does. `batch`: writes a batch's patches straight into one buffer, on the model's
device (on an accelerator the uint8 frames travel and are normalised there). `tokens`: the input ids
of a conversation with media without the processor. `video`: a video's frames read and resized as
qwen_vl_utils reads them, kept as uint8. (The prepared pixels of images seen before are kept by
content in the daemon's `bounded.BoundedCache`: models.py.)
"""
