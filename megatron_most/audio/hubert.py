"""Frozen HuBERT features for audio tokens (units) and the continuous MoST-C path.

Batched inference gives the same features as running the model on each waveform alone (what
fairseq's feature dump does). Plain zero padding does not: in "group" models (HuBERT base, mHuBERT)
the first conv layer's GroupNorm takes its per-channel statistics over the whole padded time axis,
and without an attention mask the positional conv and self-attention see the padding. So:

* the sample-level attention_mask is always passed (1 = real sample); transformers turns it into
  the frame mask, zeroes padded frames before the positional conv and masks them in attention.
  (The "don't pass attention_mask to group-norm models" advice is about matching how those models
  were trained on unpadded crops; a mask that hides the padding is exactly the unpadded computation.)
* for "group" models a forward hook recomputes that GroupNorm from the valid frames of each sample.
  Later conv layers have no norm, and their valid output frames only read valid input frames.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import HubertModel

from megatron_most.options import ConfigError


class HubertEncoder:
    """`encoder(waves)` -> one float16 [frames, dim] CPU tensor per 16 kHz mono waveform."""

    sample_rate = 16000

    def __init__(
        self,
        path: str,
        *,
        layer: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_samples: int = 16000 * 320,
    ):
        self.model = HubertModel.from_pretrained(str(path), dtype=dtype).to(device).eval().requires_grad_(False)
        config = self.model.config
        if layer is not None and not 0 <= layer <= config.num_hidden_layers:
            raise ConfigError(
                f"HubertEncoder layer={layer}: {path} has {config.num_hidden_layers} transformer "
                f"layers; use 0..{config.num_hidden_layers} (hidden_states index) or None for the last"
            )
        if max_batch_samples < 1:
            raise ConfigError(f"HubertEncoder max_batch_samples={max_batch_samples}: must be >= 1")
        self.path = str(path)
        self.layer = layer
        self.device = torch.device(device)
        self.max_batch_samples = max_batch_samples  # padded samples per forward pass (memory bound)
        self.feature_dim = config.hidden_size
        stride = int(np.prod(config.conv_stride))
        self.frame_rate = self.sample_rate / stride  # 50 Hz for HuBERT base (320x downsampling)
        self.min_samples = _receptive_field(config.conv_kernel, config.conv_stride)  # 400 for HuBERT
        self._valid = None  # [batch, time0] bool, valid first-conv frames, read by the GroupNorm hook
        if config.feat_extract_norm == "group":
            first = self.model.feature_extractor.conv_layers[0]
            first.layer_norm.register_forward_hook(self._masked_group_norm)

    def num_frames(self, num_samples: int) -> int:
        """Feature frames for a waveform of `num_samples` (transformers' conv output length)."""
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(num_samples)))

    @torch.inference_mode()
    def __call__(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        for i, wave in enumerate(waves):
            if wave.ndim != 1 or len(wave) < self.min_samples:
                raise ValueError(
                    f"HubertEncoder: wave {i} has shape {tuple(wave.shape)}; need 1-D mono with "
                    f">= {self.min_samples} samples at {self.sample_rate} Hz"
                )
        out: list[torch.Tensor | None] = [None] * len(waves)
        for batch in self._batches([len(w) for w in waves]):
            for i, features in zip(batch, self._forward([waves[i] for i in batch])):
                out[i] = features
        return out

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by similar length (less padding), each under max_batch_samples padded."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches, current = [], []
        for i in order:  # ascending, so the newest length is the batch's padded length
            if current and (len(current) + 1) * lengths[i] > self.max_batch_samples:
                batches.append(current)
                current = []
            current.append(i)
        return batches + [current] if current else batches

    def _forward(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        lengths = torch.tensor([len(w) for w in waves])
        padded = torch.zeros(len(waves), int(lengths.max()), dtype=self.model.dtype)  # [batch, samples]
        for row, wave in enumerate(waves):
            padded[row, : len(wave)] = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # [batch, samples]
        kernel, stride = self.model.config.conv_kernel[0], self.model.config.conv_stride[0]
        time0 = torch.arange(_conv_len(padded.shape[1], kernel, stride))  # first conv layer's frames
        self._valid = (time0[None, :] < _conv_len(lengths, kernel, stride)[:, None]).to(self.device)
        try:
            output = self.model(
                padded.to(self.device),
                attention_mask=mask.long().to(self.device),
                output_hidden_states=self.layer is not None,
            )
        finally:
            self._valid = None
        hidden = output.last_hidden_state if self.layer is None else output.hidden_states[self.layer]  # [b, f, d]
        frames = self.model._get_feat_extract_output_lengths(lengths)
        return [hidden[row, : int(n)].to(torch.float16).cpu() for row, n in enumerate(frames)]

    def _masked_group_norm(self, module: torch.nn.GroupNorm, inputs, output):
        """GroupNorm over each sample's valid frames only (output replaced; padded frames are don't-care)."""
        valid = self._valid
        if valid is None or bool(valid.all()):
            return output  # nothing padded: the module's own result is already right
        x = inputs[0].float()  # [batch, channels, time0]
        b, c, t = x.shape
        groups = module.num_groups
        x = x.view(b, groups, c // groups, t)
        m = valid[:, None, None, :t].to(x.dtype)  # [batch, 1, 1, time0]
        count = m.sum(dim=(2, 3), keepdim=True) * (c // groups)
        mean = (x * m).sum(dim=(2, 3), keepdim=True) / count
        var = (((x - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / count  # biased, like nn.GroupNorm
        y = ((x - mean) / torch.sqrt(var + module.eps)).view(b, c, t)
        if module.affine:
            y = y * module.weight.float()[None, :, None] + module.bias.float()[None, :, None]
        return y.to(output.dtype)


def _conv_len(n, kernel: int, stride: int):
    return (n - kernel) // stride + 1


def _receptive_field(kernels, strides) -> int:
    """Input samples one output frame of the conv stack sees (400 for HuBERT's 7-layer front end)."""
    field = 1
    for kernel, stride in reversed(list(zip(kernels, strides))):
        field = (field - 1) * stride + kernel
    return field
