"""Reference-latent control (DragDiffusion's mutual self-attention).

While the dragged latent is denoised, the self-attention layers of the decoder (layer ``start_layer`` onward,
counting the UNet's 16 self-attention layers in forward order, from sampling step ``start_step``) use the keys
and values of the *reference* branch (the un-dragged latent) instead of their own. This keeps the identity of the
image.

The reference branch does not depend on the edit, so instead of denoising a batch of two, its keys and values
are *recorded* in one pass and *replayed* for the edited branch. The result is the same as the batched form, and
a recording can be reused for every re-drag of the same image and settings.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def self_attention_names(unet) -> list[str]:
    """Names of the UNet's self-attention processors (``attn1``) in forward order (down, mid, up)."""

    def order(name: str):
        group = name.split(".")[0]
        return (_BLOCK_ORDER[group], [int(n) for n in re.findall(r"\.(\d+)\.", "." + name)])

    return sorted((n for n in unet.attn_processors if n.endswith("attn1.processor")), key=order)


@dataclass
class ReferenceRecording:
    """Keys and values of the reference branch, indexed by (sampling step, controlled layer)."""

    keys_values: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.keys_values.values())


class ReferenceControl:
    """Shared state of the processors: mode ("record", "replay" or "off") and the current sampling step.

    By default a replaying layer looks its keys and values up by step. With :meth:`use_static_buffers` it reads
    them from one fixed pair of tensors per layer instead, which :meth:`load_step` refills before each UNet call:
    then every step's UNet call reads the same tensors, and one CUDA graph serves them all.
    """

    def __init__(self, recording: ReferenceRecording, start_step: int):
        self.recording = recording
        self.start_step = start_step
        self.mode = "off"
        self.step = 0
        self.static: Optional[dict] = None

    def active(self) -> bool:
        return self.mode != "off" and self.step >= self.start_step

    def use_static_buffers(self) -> None:
        """Replay from fixed buffers, one (key, value) pair per controlled layer, from now on."""
        if self.static is None:
            self.static = {}
            for (_step, layer), (key, value) in self.recording.keys_values.items():
                if layer not in self.static:
                    self.static[layer] = (key.clone(), value.clone())

    def load_step(self) -> None:
        """Copy the current step's recorded keys and values into the static buffers (when they are used)."""
        if self.static is None or self.mode != "replay" or not self.active():
            return
        for layer, (key, value) in self.static.items():
            recorded_key, recorded_value = self.recording.keys_values[(self.step, layer)]
            key.copy_(recorded_key)
            value.copy_(recorded_value)

    def replayed(self, layer: int):
        """The (key, value) a replaying ``layer`` uses at the current step."""
        if self.static is not None:
            return self.static[layer]
        return self.recording.keys_values[(self.step, layer)]


class ReferenceAttnProcessor:
    """Self-attention that records its keys/values, or replaces them with the recorded ones."""

    def __init__(self, control: ReferenceControl, layer: int):
        self.control = control
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        heads = attn.heads

        query = attn.to_q(hidden_states)
        key, value = self._keys_values(attn, hidden_states)
        head_dim = key.shape[-1] // heads
        query, key, value = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _keys_values(self, attn, hidden_states):
        control = self.control
        slot = (control.step, self.layer)
        if control.active() and control.mode == "replay":
            key, value = control.replayed(self.layer)
            return key.to(hidden_states.dtype), value.to(hidden_states.dtype)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        if control.active() and control.mode == "record":
            control.recording.keys_values[slot] = (key.detach(), value.detach())
        return key, value


@contextmanager
def reference_control(unet, recording: ReferenceRecording, start_layer: int = 10, start_step: int = 0):
    """Install reference processors on self-attention layers ``start_layer``.. of ``unet``; restore on exit.

    Yields the :class:`ReferenceControl`; set its ``mode`` and ``step`` around each UNet call.
    """
    original = unet.attn_processors
    control = ReferenceControl(recording, start_step)
    processors = dict(original)
    for layer, name in enumerate(self_attention_names(unet)):
        if layer >= start_layer:
            processors[name] = ReferenceAttnProcessor(control, layer)
    unet.set_attn_processor(processors)
    try:
        yield control
    finally:
        unet.set_attn_processor(original)
