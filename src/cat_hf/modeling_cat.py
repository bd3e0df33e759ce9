# Copyright 2025 The cat-hf developers. Licensed under the Apache License, Version 2.0.
"""PyTorch CAT (Convolutional Audio Transformer).

CAT encodes a log-mel spectrogram with a multi-resolution convolutional stem (ConvMAE-style CBlocks at
resolutions 4 and 8, projected onto the 16x16 patch grid) followed by a post-LN ViT whose token 0 is a learned
utterance (CLS) token. It is pretrained data2vec-2.0 style: an EMA teacher sees the whole clip, several masked
copies of the clip go through the student, a 2-D CNN decoder regresses the teacher's averaged block outputs at
the masked positions, the CLS token regresses their mean, and Representation Regularization pulls a projection
of the CLS token toward a frozen external encoder's embedding of the clip.

Layout conventions (they are what makes converted checkpoints exact):
- input (batch, frames, mel_bins) is an image of height `frames` and width `mel_bins`;
- patches are flattened time-major: token `1 + F * t + f` for time patch t and frequency patch f (F = 8);
- the stem's maps are NCHW in channels-last memory; its LayerNorms normalise the channel axis.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_tracing, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_cat import CATConfig


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Output types
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CATModelOutput(BaseModelOutputWithPooling):
    """
    last_hidden_state: (batch, 1 + num_patches, hidden) output of the last block; token 0 is CLS.
    pooler_output: (batch, hidden) CLS token of the last block, or the mean of the valid patch tokens.
    hidden_states: input of the first block (after the context LayerNorm) and the output of every block.
    attentions: per-block attention probabilities (eager attention only).
    mlp_outputs: per-block MLP output before its residual add, the pretraining target layers (tokens incl. CLS).
    token_padding_mask: (batch, 1 + num_patches) bool, True for tokens that are padding (None without a mask).
    """

    mlp_outputs: tuple[torch.FloatTensor, ...] | None = None
    token_padding_mask: torch.BoolTensor | None = None


@dataclass
class CATFrameClassifierOutput(ModelOutput):
    """
    loss: masked multi-label BCE over the real frames (when `labels` are given).
    logits: (batch, frames, num_labels) per-frame logits on the label grid (`config.frame_label_hop_ms`).
    frame_times: (frames,) centre of every label frame in ms from the input's first sample
        (`config.frame_label_centre_ms`); rows past a clip's end are flagged by `frame_mask`.
    frame_mask: (batch, frames) bool, True for frames of real (not padded) time patches.
    hidden_states, attentions: as for `CATModel`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    frame_times: torch.FloatTensor | None = None
    frame_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CATForPreTrainingOutput(ModelOutput):
    """
    loss: total pretraining loss (weighted sum of the components below).
    frame_loss: masked-patch regression of the decoder output onto the teacher targets.
    utterance_loss: regression of the student's final CLS token onto the mean teacher target.
    rr_loss: Representation Regularization loss (None when no external embeddings were given).
    sample_size: number of masked patches over all clones (the original's normaliser).
    targets: (batch, num_patches, hidden) teacher targets, before repetition over clones.
    student_hidden_state: (batch * clone_batch, 1 + kept, hidden) student output on the visible tokens.
    decoder_output: (batch * clone_batch, num_patches, hidden) decoder prediction for every patch.
    mask: (batch * clone_batch, num_patches) 1 = masked.
    """

    loss: torch.FloatTensor | None = None
    frame_loss: torch.FloatTensor | None = None
    utterance_loss: torch.FloatTensor | None = None
    rr_loss: torch.FloatTensor | None = None
    sample_size: int | None = None
    targets: torch.FloatTensor | None = None
    student_hidden_state: torch.FloatTensor | None = None
    decoder_output: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Positions and masks
# ----------------------------------------------------------------------------------------------------------------


def sincos_position_table(hidden_size: int, time_patches: int, frequency_patches: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table, time-major: row `F t + f`; first half of the channels encodes f, second half t."""
    if hidden_size % 4 != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by 4 for the 2-D sin-cos positions.")
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float64)[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    t = torch.arange(time_patches).repeat_interleave(frequency_patches)
    f = torch.arange(frequency_patches).repeat(time_patches)
    return torch.cat([encode(f), encode(t)], dim=1).float().unsqueeze(0)


def compute_inverse_block_mask(
    batch_size: int,
    grid: tuple[int, int],
    *,
    mask_ratio: float = 0.8,
    mask_length: int = 5,
    mask_ratio_adjust: float = 0.07,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse block masks on a (time, frequency) token grid: (batch, time * frequency) float, 1 = masked.

    "Inverse": square blocks of `mask_length` are *kept* (visible) around random centres, everything else is
    masked. Centres are over-sampled by `mask_ratio_adjust` to make up for overlapping blocks, then every row is
    brought to exactly `int(L * (1 - mask_ratio))` kept tokens by keeping or adding random tokens, so that all
    rows of a batch keep the same count (the student batch stays rectangular).
    """
    rows, cols = grid
    length = rows * cols
    keep_ratio = 1.0 - mask_ratio
    num_centres = int(length * (keep_ratio + mask_ratio_adjust) / mask_length**2)
    centres = torch.randint(0, length, (batch_size, max(num_centres, 1)), generator=generator)
    keep = torch.zeros(batch_size, length)
    keep.scatter_(1, centres, 1.0)
    # Grow every centre into a mask_length x mask_length block clipped at the borders (offsets -o .. L-1-o).
    before = mask_length // 2
    after = mask_length - 1 - before
    keep = F.pad(keep.view(batch_size, 1, rows, cols), (after, before, after, before))
    keep = F.max_pool2d(keep, kernel_size=mask_length, stride=1).view(batch_size, length)
    # Equalise the kept count: originally kept tokens rank first, ties broken at random.
    target = int(length * keep_ratio)
    if target < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible token on a {rows}x{cols} grid.")
    score = keep + 0.5 * torch.rand(batch_size, length, generator=generator)
    chosen = score.topk(target, dim=1).indices
    mask = torch.ones(batch_size, length)
    mask.scatter_(1, chosen, 0.0)
    return mask.to(device) if device is not None else mask


def _nearest_index(size: int, factor: int, limit: int, device) -> torch.Tensor:
    """Token-grid row of every cell of a grid `factor` times finer (cells past the last token map onto it)."""
    return (torch.arange(size, device=device) // factor).clamp_(max=limit - 1)


# ----------------------------------------------------------------------------------------------------------------
# Linear products on CPU
# ----------------------------------------------------------------------------------------------------------------


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight (out, in) or a 1x1 convolution's (out, in, 1, 1).

    On CPU in float32 (outside autocast) the rows run as a 1x1 convolution over a channels-last view, which oneDNN
    runs faster than the BLAS GEMM behind `F.linear` (benchmarks/bench_linear_layers.py: CAT-base inference ~10 %).
    """
    weight = weight.flatten(1) if weight.ndim == 4 else weight
    onednn = (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
              and not torch.is_autocast_enabled("cpu") and x.numel() >= 64 * x.shape[-1])
    if not onednn:
        return F.linear(x, weight, bias)
    rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)  # (1, in, N, 1), channels-last: no copy
    out = F.conv2d(rows, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, computed by `pointwise` when nothing can tell the difference: a plain `nn.Linear` with a plain
    weight, no hooks and no patched forward, outside tracing, compiling and export. A layer replaced or wrapped by
    tooling (dynamic quantisation, PEFT/LoRA, hooks) and every traced or exported graph run `module(x)` itself, so
    they see an ordinary linear layer."""
    if (type(module) is nn.Linear and type(module.weight) is nn.Parameter and not module._forward_hooks
            and not module._forward_pre_hooks and "forward" not in module.__dict__ and not is_tracing(x)):
        return pointwise(x, module.weight, module.bias)
    return module(x)


# ----------------------------------------------------------------------------------------------------------------
# Stem
# ----------------------------------------------------------------------------------------------------------------


class CATChannelNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map. On channels-last memory the permutes are free views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CATStemDownsample(nn.Module):
    """Strided convolution (kernel = stride) followed by a LayerNorm over channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=stride, stride=stride)
        self.norm = CATChannelNorm(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class CATConvBlock(nn.Module):
    """ConvMAE CBlock: x += pw_out(dw_conv(keep * pw_in(LN(x)))); x += MLP(LN(x)), with 1x1 convolutions.

    `keep` (B, 1, H, W) zeroes masked or padded cells right before the depthwise convolution, the only place where
    neighbouring cells mix, so that nothing leaks from them into visible cells.
    """

    def __init__(self, channels: int, mlp_ratio: float, kernel_size: int, eps: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.norm1 = CATChannelNorm(channels, eps=eps)
        self.pw_in = nn.Conv2d(channels, channels, 1)
        self.dw_conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.pw_out = nn.Conv2d(channels, channels, 1)
        self.norm2 = CATChannelNorm(channels, eps=eps)
        self.mlp_in = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.mlp_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        y = self.pw_in(self.norm1(x))
        if keep is not None:
            y = y * keep
        x = x + self.pw_out(self.dw_conv(y))
        return x + self.mlp_out(self.act(self.mlp_in(self.norm2(x))))


class CATMultiResolutionStem(nn.Module):
    """The paper's multi-resolution block: stages at resolutions 4, 8 and 16 whose outputs all land on the
    16x16 patch grid and are summed, so tokens carry fine time-frequency detail at ViT cost.

    Maps are NCHW in channels-last memory: the 1x1 convolutions then run as oneDNN GEMMs (markedly faster than
    `nn.Linear` on CPU) and the channel LayerNorms need no copies.
    """

    def __init__(self, config: CATConfig):
        super().__init__()
        self.patch_size = config.patch_size
        channels = [*config.stem_channels, config.hidden_size]
        eps = config.stem_layer_norm_eps
        self.downsamples = nn.ModuleList(
            CATStemDownsample(1 if i == 0 else channels[i - 1], channels[i], stride, eps)
            for i, stride in enumerate(config.stem_strides)
        )
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                CATConvBlock(channels[i], config.stem_mlp_ratio, config.stem_kernel_size, eps) for _ in range(depth)
            )
            for i, depth in enumerate(config.stem_depths)
        )
        self.resolutions = [math.prod(config.stem_strides[: i + 1]) for i in range(len(config.stem_strides))]
        self.stage_projections = nn.ModuleList(
            nn.Conv2d(channels[i], config.hidden_size, kernel_size=self.patch_size // r, stride=self.patch_size // r)
            for i, r in enumerate(self.resolutions[:-1])
        )
        self.token_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, spectrogram: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """spectrogram (B, 1, T, F), keep (B, T/16, F/16) token keep map or None -> tokens (B, N, D), time-major."""
        x = spectrogram.contiguous(memory_format=torch.channels_last)
        stage_tokens = []
        for i, downsample in enumerate(self.downsamples):
            x = downsample(x)
            if i == len(self.downsamples) - 1:
                break
            cell_keep = None
            if keep is not None:
                factor = self.patch_size // self.resolutions[i]
                rows = _nearest_index(x.shape[2], factor, keep.shape[1], x.device)
                cols = _nearest_index(x.shape[3], factor, keep.shape[2], x.device)
                cell_keep = keep[:, rows][:, :, cols].unsqueeze(1).to(x.dtype)
            for block in self.blocks[i]:
                x = block(x, cell_keep)
            stage_tokens.append(_grid_to_tokens(self.stage_projections[i](x)))
        tokens = linear(self.token_proj, _grid_to_tokens(x))
        for extra in stage_tokens:
            tokens = tokens + extra
        return tokens


    def forward_visible(self, spectrogram: torch.Tensor, kept_ids: torch.Tensor) -> torch.Tensor:
        """Tokens of the kept patches only, (B, K, D) in the order of `kept_ids` (B, K) - the masked pretraining path.

        Equal to `forward(spectrogram, keep)` at the kept patches, at about a fifth of the cost for 80% masking:
        every layer except the depthwise convolution works within a patch (the strided convolutions are
        patch-aligned), so only the cells of kept patches are computed, as tiles (B, K, n, n, C) of side
        n = patch_size / resolution. The depthwise convolution, the one place where neighbouring patches mix, runs
        on a zero-filled full grid, which is exactly what the keep map does to masked cells in the dense path.
        """
        batch, _, frames, bins = spectrogram.shape
        grid = (frames // self.patch_size, bins // self.patch_size)
        p = self.patch_size
        pixels = spectrogram[:, 0, : grid[0] * p, : grid[1] * p].reshape(batch, grid[0], p, grid[1], p)
        pixels = pixels.permute(0, 1, 3, 2, 4).reshape(batch, grid[0] * grid[1], p, p, 1)
        x = torch.gather(pixels, 1, kept_ids[:, :, None, None, None].expand(-1, -1, p, p, 1))
        stage_tokens = []
        for i, downsample in enumerate(self.downsamples):
            x = _tile_conv(x, downsample.conv)
            x = nn.LayerNorm.forward(downsample.norm, x)
            if i == len(self.downsamples) - 1:
                break
            cells = _tile_cell_index(kept_ids, grid, x.shape[2])
            for block in self.blocks[i]:
                x = self._visible_block(block, x, cells, grid)
            stage_tokens.append(_tile_conv(x, self.stage_projections[i])[:, :, 0, 0])
        tokens = pointwise(x[:, :, 0, 0], self.token_proj.weight, self.token_proj.bias)
        for extra in stage_tokens:
            tokens = tokens + extra
        return tokens

    @staticmethod
    def _visible_block(block: CATConvBlock, x: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]):
        batch, kept, n, _, channels = x.shape
        y = pointwise(nn.LayerNorm.forward(block.norm1, x), block.pw_in.weight, block.pw_in.bias)
        dense = y.new_zeros(batch, grid[0] * n * grid[1] * n, channels)
        index = cells.reshape(batch, -1, 1).expand(-1, -1, channels)
        dense = dense.scatter(1, index, y.reshape(batch, -1, channels))
        dense = dense.view(batch, grid[0] * n, grid[1] * n, channels).permute(0, 3, 1, 2)
        mixed = block.dw_conv(dense).permute(0, 2, 3, 1).reshape(batch, -1, channels)
        mixed = torch.gather(mixed, 1, index).view_as(y)
        x = x + pointwise(mixed, block.pw_out.weight, block.pw_out.bias)
        hidden = block.act(pointwise(nn.LayerNorm.forward(block.norm2, x), block.mlp_in.weight, block.mlp_in.bias))
        return x + pointwise(hidden, block.mlp_out.weight, block.mlp_out.bias)


def _tile_conv(tiles: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A convolution with kernel = stride applied inside each patch tile: (B, K, n, n, C) -> (B, K, n/s, n/s, C')."""
    batch, kept, n, _, channels = tiles.shape
    s = conv.stride[0]
    blocks = tiles.reshape(batch, kept, n // s, s, n // s, s, channels).permute(0, 1, 2, 4, 3, 5, 6)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (out, s, s, in) like the blocks
    return pointwise(blocks.reshape(batch, kept, n // s, n // s, s * s * channels), weight, conv.bias)


def _tile_cell_index(kept_ids: torch.Tensor, grid: tuple[int, int], n: int) -> torch.Tensor:
    """Flat index on the full (grid[0] * n, grid[1] * n) cell grid of every cell of every kept patch: (B, K, n, n)."""
    t = torch.div(kept_ids, grid[1], rounding_mode="floor")
    f = kept_ids % grid[1]
    offsets = torch.arange(n, device=kept_ids.device)
    rows = (t * n)[..., None, None] + offsets[:, None]
    cols = (f * n)[..., None, None] + offsets[None, :]
    return rows * (grid[1] * n) + cols


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T', F') -> (B, T' * F', C), time-major."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class CATPatchStem(nn.Module):
    """EAT-style stem: one 16x16 convolution."""

    def __init__(self, config: CATConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, spectrogram: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return _grid_to_tokens(self.proj(spectrogram))


class CATEmbeddings(nn.Module):
    """Stem + fixed positions + learned extra (CLS) tokens + the context LayerNorm over the whole sequence."""

    def __init__(self, config: CATConfig):
        super().__init__()
        self.config = config
        self.stem = CATMultiResolutionStem(config) if config.stem_type == "multires" else CATPatchStem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, config.num_extra_tokens, config.hidden_size))
        # Persistent: fp16-trained checkpoints store a rounded table and the original's outputs use that table.
        self.register_buffer(
            "position_embeddings",
            sincos_position_table(config.hidden_size, config.max_time_patches, config.frequency_patches),
            persistent=True,
        )
        self.context_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def patch_tokens(
        self, spectrogram: torch.Tensor, keep: torch.Tensor | None = None, first_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1, T, F) -> patch tokens with positions (B, T/16 * F/16, D).

        first_rows: optional (B,) time patch where each clip starts (left padding by whole patches): its patches
        then get the positions they have alone, from 0 (the padding patches before it get position 0 too).
        """
        tokens = self.stem(spectrogram, keep)
        if first_rows is None:
            return tokens + self.position_embeddings[:, : tokens.shape[1]].to(tokens.dtype)
        freq = self.config.frequency_patches
        rows = torch.arange(tokens.shape[1] // freq, device=tokens.device)
        rows = (rows[None, :] - first_rows[:, None]).clamp(min=0)
        index = (rows[:, :, None] * freq + torch.arange(freq, device=tokens.device)).flatten(1)
        return tokens + self.position_embeddings[0, index].to(tokens.dtype)

    def visible_patch_tokens(self, spectrogram: torch.Tensor, kept_ids: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions of the kept patches only, (B, K, D) in `kept_ids` order (masked pretraining).
        The multi-resolution stem computes only what the kept patches need (nothing leaks from masked ones)."""
        positions = self.position_embeddings[0, kept_ids]
        if isinstance(self.stem, CATMultiResolutionStem):
            tokens = self.stem.forward_visible(spectrogram, kept_ids)
        else:
            tokens = self.stem(spectrogram)
            tokens = torch.gather(tokens, 1, kept_ids[..., None].expand(-1, -1, tokens.shape[-1]))
        return tokens + positions.to(tokens.dtype)

    def add_extra_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the extra tokens (no positions) and apply the context LayerNorm to the whole sequence."""
        extra = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.context_norm(torch.cat([extra, tokens], dim=1))


# ----------------------------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------------------------


class CATDropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns its probabilities. `attention_mask`: None, a bool mask (True = attend)
    or an additive float mask, broadcastable to (B, heads, N, N). Returns (B, N, heads, head_dim) and the weights."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(F.dropout(weights, dropout, module.training), value)
    return output.transpose(1, 2).contiguous(), weights


class CATAttention(nn.Module):
    """Multi-head self-attention through transformers' attention registry (`config._attn_implementation`: eager,
    sdpa, flash_attention_*, flex_attention). Asked for its probabilities (`output_attentions=True`), it runs the
    eager function whatever the implementation: the fused kernels do not return them."""

    def __init__(self, config: CATConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = linear(self.q_proj, hidden_states).view(shape).transpose(1, 2)
        key = linear(self.k_proj, hidden_states).view(shape).transpose(1, 2)
        value = linear(self.v_proj, hidden_states).view(shape).transpose(1, 2)
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention(
            self, query, key, value, attention_mask, dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling, **kwargs,
        )
        return linear(self.o_proj, output.reshape(*hidden_states.shape[:-1], -1)), weights


class CATMLP(nn.Module):
    """fc1 -> `config.hidden_act` (GELU, exact, in every CAT checkpoint) -> dropout -> fc2. Its output, before the
    residual add, is what the pretraining targets average (recorded as `mlp_outputs`)."""

    def __init__(self, config: CATConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, self.dropout(self.act(linear(self.fc1, x))))


class CATLayer(GradientCheckpointingLayer):
    """Post-LN block (data2vec 2.0): x = LN1(x + attn(x)); x = LN2(x + MLP(x))."""

    def __init__(self, config: CATConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = CATAttention(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CATMLP(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop_path = CATDropPath(drop_path)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attended, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.norm1(hidden_states + self.drop_path(self.dropout(attended)))
        mlp_output = self.mlp(hidden_states)
        return self.norm2(hidden_states + self.drop_path(self.dropout(mlp_output)))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class CATPreTrainedModel(PreTrainedModel):
    config_class = CATConfig
    config: CATConfig
    base_model_prefix = "cat"
    main_input_name = "input_values"
    input_modalities = ("audio",)
    supports_gradient_checkpointing = True
    # Plain bidirectional attention with a key-padding mask built by `create_bidirectional_mask`, every keyword
    # argument passed through to the attention function: any registered implementation applies.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": CATLayer,
        "attentions": CATAttention,
        "mlp_outputs": OutputRecorder(CATMLP, index=0),
    }
    _no_split_modules = ["CATLayer", "CATEmbeddings"]
    # The stem is the model's "input embeddings": `enable_input_require_grads` (which PEFT calls for adapters with
    # gradient checkpointing) hooks it, so that reentrant checkpointing of frozen blocks still reaches the adapters.
    _input_embed_layer = "stem"
    # A pretraining folder also holds the EMA teacher, the decoder and the RR projector: loading its encoder (AutoModel,
    # or a classifier to finetune) leaves them out on purpose, so they are not reported as unexpected.
    _keys_to_ignore_on_load_unexpected = [r"^teacher\.", r"^decoder\.", r"^rr_projector\."]

    @property
    def is_gradient_checkpointing(self) -> bool:
        """The old name of `is_activation_checkpointing`, which PEFT 0.21 reads on every wrap and load: transformers 5
        deprecates it with a FutureWarning that users can do nothing about, so CAT answers it without one."""
        return self.is_activation_checkpointing

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Lists every CAT head in `auto_map`, so that one folder serves AutoModel, AutoModelForAudioClassification,
        AutoModelForAudioFrameClassification and AutoModelForPreTraining for `trust_remote_code=True` users
        (transformers only adds the saved class)."""
        module = CATModel.__module__.split(".")[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoConfig", f"{CATConfig.__module__.split('.')[-1]}.CATConfig")
        auto_map.update({
            "AutoModel": f"{module}.CATModel",
            "AutoModelForAudioClassification": f"{module}.CATForAudioClassification",
            "AutoModelForAudioFrameClassification": f"{module}.CATForAudioFrameClassification",
            "AutoModelForPreTraining": f"{module}.CATForPreTraining",
        })
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Linear layers truncated-normal(0.02), convolutions PyTorch-default, norms 1/0, CLS N(0, 1), fixed positions."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default, as the original's stem and decoder: the uniform bias keeps the level of flat
            # regions visible through the channel LayerNorm that follows the first convolution.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        elif isinstance(module, CATEmbeddings):
            init.normal_(module.cls_token, std=1.0)
            init.copy_(
                module.position_embeddings,
                sincos_position_table(self.config.hidden_size, self.config.max_time_patches,
                                      self.config.frequency_patches)
            )


def _as_spectrogram(input_values: torch.Tensor, config: CATConfig) -> torch.Tensor:
    """Accept (B, T, F) or (B, 1, T, F); check the length against the stem and the positional table."""
    if not isinstance(input_values, torch.Tensor):
        raise TypeError(
            f"input_values must be a torch.Tensor, got {type(input_values).__name__}; call the feature extractor "
            "with return_tensors='pt' (or wrap arrays with torch.from_numpy)."
        )
    if input_values.ndim == 3:
        input_values = input_values.unsqueeze(1)
    if input_values.ndim != 4 or input_values.shape[1] != 1:
        raise ValueError(
            f"input_values must have shape (batch, frames, {config.num_mel_bins}) or (batch, 1, frames, "
            f"{config.num_mel_bins}), got {tuple(input_values.shape)}; use CATFeatureExtractor to make them."
        )
    frames, bins = input_values.shape[-2:]
    if bins != config.num_mel_bins:
        raise ValueError(f"input_values has {bins} mel bins but the model expects {config.num_mel_bins}.")
    if frames < config.patch_size:
        raise ValueError(
            f"input has {frames} frames, fewer than one patch ({config.patch_size} frames = "
            f"{config.patch_size * 10} ms of audio); pad the clip (CATFeatureExtractor(padding='longest') pads to a "
            f"multiple of {config.patch_size})."
        )
    if frames // config.patch_size > config.max_time_patches:
        raise ValueError(
            f"input has {frames} frames but the positional table covers at most {config.max_frames} frames "
            f"({config.max_time_patches} time patches); split long audio into windows "
            "(cat_hf.inference.predict_long does this)."
        )
    return input_values


def _check_attention_mask_shape(attention_mask: torch.Tensor, spectrogram: torch.Tensor) -> None:
    batch, frames = spectrogram.shape[0], spectrogram.shape[2]
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, frames):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask has shape {shape}, but input_values has {batch} clips of {frames} frames: pass the "
            f"({batch}, {frames}) mask over frames that CATFeatureExtractor returns with them."
        )


def _check_values(spectrogram: torch.Tensor, attention_mask: torch.Tensor | None, patch_size: int) -> None:
    """Checks of the input's values, run in eager mode only (they read tensor values, which traced, compiled and
    exported graphs cannot branch on): finite features; a mask of 0/1 (or bool) that marks one run of real frames,
    preceded by whole patches of padding or none."""

    def rows(flags: torch.Tensor) -> list[int]:
        return flags.nonzero().flatten().tolist()[:5]

    finite = torch.isfinite(spectrogram).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(
            f"input_values rows {rows(~finite)} hold NaN or infinite values, which would make every output NaN; "
            "check the audio (CATFeatureExtractor rejects non-finite samples) or the features you computed."
        )
    if attention_mask is None:
        return
    if attention_mask.dtype != torch.bool:
        odd = (attention_mask != 0) & (attention_mask != 1)
        if bool(odd.any()):
            raise ValueError(
                f"attention_mask rows {rows(odd.any(dim=1))} hold {attention_mask[odd][0].item()!r}: it must be 1 for "
                "real frames and 0 for padding (or a bool mask), as CATFeatureExtractor returns it."
            )
    real = attention_mask.bool()
    runs = real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(dim=1)
    if bool((runs > 1).any()):
        raise ValueError(
            f"attention_mask rows {rows(runs > 1)} have padding between real frames; a mask marks one run of real "
            "frames per clip (CATFeatureExtractor pads after them)."
        )
    first = real.long().argmax(dim=1)
    misaligned = (first % patch_size != 0) & real.any(dim=1)
    if bool(misaligned.any()):
        raise ValueError(
            f"attention_mask rows {rows(misaligned)} have padding before real frames that is not a whole number of "
            f"patches ({first[misaligned][0].item()} frames, not a multiple of {patch_size}). CAT's patch grid and "
            "positions are absolute, so such a clip cannot give the output it gives alone. Pass right-padded batches "
            "(real frames first, as CATFeatureExtractor pads them) or left-pad by whole patches of "
            f"{patch_size} frames."
        )


class CATModel(CATPreTrainedModel):
    """The CAT encoder: stem, positions, CLS token, context LayerNorm and post-LN transformer blocks.

    Lengths that are not a multiple of 16 frames behave as in the original: floor(T / 16) time patches, and
    with the multi-resolution stem the trailing T mod 16 frames still influence the tokens through the stem's
    finer grids. `attention_mask` (B, T) over frames (1 = real) makes padded tokens invisible to attention and
    to the stem's depthwise convolutions, so a clip gives the same output alone and padded inside a batch. A
    patch row with any real frame counts as real: `CATFeatureExtractor(padding="longest")` pads a clip to whole
    patches with its mask, so that a 29-frame clip has 2 time patches alone and in any batch (unpadded, without a
    mask, it has floor(29 / 16) = 1, as in the original).

    Padding goes after the real frames (right padding), or before them by whole patches of 16 frames: the clip's
    patches then get the positions they have alone, so the result is exact. Left padding by part of a patch would
    shift the clip against the patch grid and cannot give the clip's own output, so it is refused (eager mode).
    """

    def __init__(self, config: CATConfig):
        super().__init__(config)
        self.embeddings = CATEmbeddings(config)
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # no tensors: meta-safe
        self.layers = nn.ModuleList(CATLayer(config, rate) for rate in rates)
        self.gradient_checkpointing = False
        self.post_init()

    def real_time_patches(self, attention_mask: torch.Tensor, time_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame mask (B, T) -> ((B, time_patches) bool, True for patches holding a real frame; (B,) index of each
        clip's first patch). Computed from the first real frame and the count of real frames, so it traces."""
        patch = self.config.patch_size
        real = attention_mask.bool()
        first = real.long().argmax(dim=1)  # 0 for a row without real frames
        start = torch.div(first, patch, rounding_mode="floor")
        end = torch.div(first + real.sum(dim=1) + patch - 1, patch, rounding_mode="floor")
        index = torch.arange(time_patches, device=attention_mask.device)[None, :]
        return (index >= start[:, None]) & (index < end[:, None]), start

    def encode(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs: Unpack[TransformersKwargs]):
        """Run the blocks on an embedded sequence (B, N, D); `attention_mask` in the attention function's format."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states

    @capture_outputs
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CATModelOutput:
        r"""
        input_values: (batch, frames, mel_bins) normalised log-mel frames from `CATFeatureExtractor`.
        attention_mask: optional (batch, frames), 1 for real frames, 0 for padding.
        output_hidden_states / output_attentions: also return the input of the first block and every block's output /
            every block's attention probabilities (computed by the eager function whatever the implementation).
        output_mlp_outputs: also return every block's MLP output before its residual (the pretraining targets).
        """
        config = self.config
        spectrogram = _as_spectrogram(input_values, config).to(self.embeddings.cls_token.dtype)
        if attention_mask is not None:
            _check_attention_mask_shape(attention_mask, spectrogram)
        if not is_tracing(spectrogram):
            _check_values(spectrogram, attention_mask, config.patch_size)

        keep = first_rows = padding = mask = None
        if attention_mask is not None:
            real_rows, first_rows = self.real_time_patches(attention_mask, spectrogram.shape[2] // config.patch_size)
            keep = real_rows[:, :, None].expand(-1, -1, config.frequency_patches)  # (B, T', F) for the stem
            # Time-major per token, by indexing: flattening the expanded map would stop exports with a dynamic length.
            real_patches = real_rows[:, torch.arange(keep[0].numel(), device=keep.device) // config.frequency_patches]
            real_tokens = torch.cat([real_rows.new_ones(real_rows.shape[0], config.num_extra_tokens), real_patches], 1)
            padding = ~real_tokens
        hidden_states = self.embeddings.add_extra_tokens(self.embeddings.patch_tokens(spectrogram, keep, first_rows))
        if kwargs.get("output_attentions", config.output_attentions):
            kwargs["output_attentions"] = True  # the blocks then run the eager function, which takes this bool mask
            mask = None if padding is None else real_tokens[:, None, None, :]
        elif padding is not None:
            mask = create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=real_tokens)
        last = self.encode(hidden_states, mask, **kwargs)
        pooled = self.pool(last, padding)
        return CATModelOutput(last_hidden_state=last, pooler_output=pooled, token_padding_mask=padding)

    def pool(self, last_hidden_state: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """CLS token, the mean of the (valid) patch tokens, or their linear-softmax pooling (`config.pooling`)."""
        if self.config.pooling == "cls":
            return last_hidden_state[:, 0]
        patches = last_hidden_state[:, self.config.num_extra_tokens:]
        if self.config.pooling == "lin_softmax":
            return linear_softmax_pool(patches, None if padding is None else padding[:, self.config.num_extra_tokens:])
        if padding is None:
            return patches.mean(dim=1)
        weights = (~padding[:, self.config.num_extra_tokens:]).unsqueeze(-1).to(patches.dtype)
        return (patches * weights).sum(1) / weights.sum(1).clamp(min=1)


def linear_softmax_pool(tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """The original's LIN_SOFTMAX pooling of (B, N, C) tokens to (B, C), in float32, padded tokens left out.

    Each channel is read as a probability p = sigmoid(x); the clip's probability is sum(p^2) / sum(p) over the
    tokens, which weighs confident tokens most, and is returned as a logit. Computed in log space as the original does
    (including its 1e-6 inside the denominator and its clamping), so that the numbers match.
    """
    log_p = F.logsigmoid(tokens.float())
    if padding is not None:
        log_p = log_p.masked_fill(padding.unsqueeze(-1), float("-inf"))
    log_pooled = (torch.logsumexp(log_p + log_p, dim=1) - torch.logsumexp(log_p + 1e-6, dim=1)).clamp(max=0)
    logit = log_pooled - torch.log(-torch.expm1(log_pooled))
    return torch.nan_to_num(logit, nan=0.0, posinf=0.0, neginf=0.0).to(tokens.dtype)


def window_starts(num_frames: int, window_frames: int, hop_frames: int) -> list[int]:
    """First frame of each sliding window over a clip of `num_frames` frames: one every `hop_frames`, the last moved
    back to end at the clip's last frame (no window is mostly padding); a single window when the clip fits in one.
    The one windowing rule of cat-hf: `CATForAudioClassification` (so `pipeline`) and `cat_hf.inference` use it."""
    if num_frames <= window_frames:
        return [0]
    last = num_frames - window_frames
    starts = list(range(0, last + 1, hop_frames))
    if starts[-1] != last:
        starts.append(last)
    return starts


#: Windows per encoder pass when a long input is scored by windows.
WINDOW_BATCH_SIZE = 16


class CATClassifierBase(CATPreTrainedModel):
    """The CAT encoder (`cat`) with the classifiers' head: `fc_norm` (LayerNorm, or Identity without
    `config.use_fc_norm`) and a linear `classifier` to `config.num_labels` logits. The clip and the frame classifier
    differ only in what they feed it; these attribute names are the state-dict keys of every saved checkpoint."""

    def __init__(self, config: CATConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cat = CATModel(config)
        self.fc_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.classifier_norm_eps) if config.use_fc_norm else nn.Identity()
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class CATForAudioClassification(CATClassifierBase):
    """CAT encoder + LayerNorm (fc_norm) + linear head on the pooled token (CLS by default).

    With `config.window_frames` set (`cat-hf finetune` sets its training length), an input longer than that is
    scored in eval mode by sliding windows (`window_starts`) whose class probabilities are averaged (max for
    multi-label models); the logits returned are those of the aggregated probabilities, so softmax / sigmoid of them,
    as `pipeline` applies, gives the aggregate.
    """

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        labels: (batch,) class indices for single-label, (batch, num_labels) multi-hot floats for multi-label
            tagging, or (batch,) / (batch, 1) floats for regression. The loss follows `config.problem_type`
            (inferred from the labels when unset, as transformers does). Other keyword arguments (as PEFT and
            Trainer pass) go to the encoder and the loss, which ignore those they do not use.
        """
        window = self.config.window_frames
        if window is not None and not self.training and input_values.shape[-2] > window:
            logits = self.windowed_logits(input_values, attention_mask)
            loss = None if labels is None else self.compute_loss(logits, labels, **kwargs)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        outputs = self.cat(input_values, attention_mask=attention_mask, return_dict=True, **kwargs)
        logits = self.classifier(self.fc_norm(outputs.pooler_output))
        loss = None if labels is None else self.compute_loss(logits, labels, **kwargs)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    @property
    def multi_label(self) -> bool:
        return self.config.problem_type == "multi_label_classification"

    def window_probabilities(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
                             ) -> list[torch.Tensor]:
        """Per clip, the (num_windows, num_labels) class probabilities of its sliding windows (`window_starts` over
        its real frames; right-padded batches, as CATFeatureExtractor pads them)."""
        config = self.config
        window = config.window_frames or input_values.shape[-2]
        hop = config.window_hop_frames or max(1, window // 2)
        spectrogram = input_values.reshape(input_values.shape[0], -1, input_values.shape[-1])
        frames = spectrogram.shape[1]
        if attention_mask is None:
            mask = torch.ones(spectrogram.shape[:2], dtype=torch.int64, device=spectrogram.device)
        else:
            _check_attention_mask_shape(attention_mask, spectrogram[:, None])
            mask = attention_mask.to(torch.int64)
            if bool((mask[:, 0] == 0).any()):
                raise ValueError("attention_mask has padding before real frames; scoring long clips by windows needs "
                                 "right-padded batches (real frames first, as CATFeatureExtractor pads them).")
        windows, window_masks, owners = [], [], []
        for row, length in enumerate(mask.sum(dim=1).tolist()):
            for start in window_starts(int(length), window, hop):
                end = min(start + window, frames)
                windows.append(spectrogram[row, start:end])
                window_masks.append(mask[row, start:end])
                owners.append(row)
        logits = torch.cat([
            self.classifier(self.fc_norm(self.cat(
                torch.stack(windows[i:i + WINDOW_BATCH_SIZE]),
                attention_mask=torch.stack(window_masks[i:i + WINDOW_BATCH_SIZE]),
            ).pooler_output))
            for i in range(0, len(windows), WINDOW_BATCH_SIZE)
        ]).float()
        probabilities = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
        owners = torch.tensor(owners, device=probabilities.device)
        return [probabilities[owners == row] for row in range(spectrogram.shape[0])]

    def windowed_logits(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, num_labels) logits of the clips' window-aggregated probabilities: log of the mean for single-label
        models (softmax gives the mean back), logit of the max for multi-label ones (sigmoid gives the max back)."""
        per_clip = self.window_probabilities(input_values, attention_mask)
        if self.multi_label:
            return torch.logit(torch.stack([p.max(dim=0).values for p in per_clip]), eps=1e-7)
        return torch.stack([p.mean(dim=0) for p in per_clip]).clamp(min=1e-30).log()

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers' classification loss (`self.loss_function`) in float32, plus soft targets: (batch, num_labels)
        float labels with problem_type single_label_classification (mixup, label smoothing) give the cross-entropy
        with those distributions."""
        logits, labels = logits.float(), labels.to(logits.device)
        problem = self.config.problem_type
        if problem == "single_label_classification" and labels.ndim == 2 and labels.is_floating_point():
            return -(labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        if problem in ("regression", "multi_label_classification") or self.num_labels == 1:
            labels = labels.float()
        return self.loss_function(labels, logits, self.config, **kwargs)


class CATForAudioFrameClassification(CATClassifierBase):
    """CAT encoder + a per-frame head for sound event detection: the frequency tokens of every time patch are
    averaged, normalised (fc_norm) and projected to `num_labels` logits, one row per 160 ms patch; with
    `config.frame_label_hop_ms` finer than the patch hop, each patch's logits are repeated on that label grid.
    The loss is multi-label BCE over the frames of real (not padded) patches."""

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CATFrameClassifierOutput:
        r"""
        labels: (batch, frames, num_labels) 0/1 (or soft) targets on the label grid, the shape of `logits`: frame
            k is centred at `config.frame_label_centre_ms(k)`. Frames of padded patches do not count.
        """
        config = self.config
        outputs = self.cat(input_values, attention_mask=attention_mask, return_dict=True, **kwargs)
        patches = outputs.last_hidden_state[:, config.num_extra_tokens:]
        per_patch = patches.unflatten(1, (-1, config.frequency_patches)).mean(dim=2)  # (B, T', D)
        repeats = config.frame_label_repeats
        logits = self.classifier(self.fc_norm(per_patch)).repeat_interleave(repeats, dim=1)
        if outputs.token_padding_mask is None:
            frame_mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        else:
            patch_padding = outputs.token_padding_mask[:, config.num_extra_tokens:: config.frequency_patches]
            frame_mask = ~patch_padding.repeat_interleave(repeats, dim=1)
        frame_times = config.frame_label_centre_ms(torch.arange(logits.shape[1], device=logits.device).float())
        loss = None if labels is None else self.compute_loss(logits, labels, frame_mask)
        return CATFrameClassifierOutput(
            loss=loss, logits=logits, frame_times=frame_times, frame_mask=frame_mask,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy averaged over the real frames and the labels (padded frames weigh nothing)."""
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, but the logits of this batch have {tuple(logits.shape)} "
                f"(batch, frames every {self.config.time_patch_hop_ms / self.config.frame_label_repeats:g} ms, "
                f"num_labels): give one row of {self.num_labels} targets per label frame, frame k centred at "
                "config.frame_label_centre_ms(k)."
            )
        errors = F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device).float(), reduction="none")
        weights = frame_mask[..., None].to(errors.dtype)
        return (errors * weights).sum() / (weights.sum() * self.num_labels).clamp(min=1)


class CATDecoder(nn.Module):
    """2-D CNN decoder of pretraining: on the full (time, frequency) token grid, `decoder_layers` residual layers of
    grouped 3x3 convolution -> LayerNorm over channels without affine parameters -> GELU, then a linear projection."""

    def __init__(self, config: CATConfig):
        super().__init__()
        dim = config.hidden_size
        self.eps = config.stem_layer_norm_eps
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, config.decoder_kernel_size, padding=config.decoder_kernel_size // 2,
                      groups=config.decoder_groups)
            for _ in range(config.decoder_layers)
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, length, dim = tokens.shape
        x = tokens.transpose(1, 2).reshape(batch, dim, *grid)
        for conv in self.convs:
            y = F.layer_norm(conv(x).permute(0, 2, 3, 1), (dim,), eps=self.eps).permute(0, 3, 1, 2)
            x = x + F.gelu(y)
        return linear(self.proj, x.reshape(batch, dim, length).transpose(1, 2))


class CATForPreTraining(CATPreTrainedModel):
    """Bootstrap pretraining with an EMA teacher and Representation Regularization.

    - `cat`: the student encoder; `teacher`: its exponential moving average (stem included), kept in fp32 and
      updated with `update_teacher(step)` after every optimiser step.
    - forward(input_values, mask=None, rr_embeddings=None): every clip is cloned `clone_batch` times with its own
      inverse block mask; the student sees only the visible tokens plus CLS (the multi-resolution stem runs with the
      mask multiplied in before every depthwise convolution, so nothing leaks from masked regions); the decoder
      fills masked slots with N(0, mask_noise_std) tokens and predicts every patch.
    - Losses, all element-wise squared errors scaled by 1/sqrt(dim) and normalised by the number of masked
      patches (`sample_size`) as the original's criterion does: frame (decoder vs. targets at masked patches),
      utterance (final CLS vs. the patch-mean of the targets), RR (projected CLS vs. the external embedding).
    """

    def __init__(self, config: CATConfig):
        super().__init__(config)
        self.cat = CATModel(config)
        self.decoder = CATDecoder(config)
        self.rr_projector = nn.Linear(config.hidden_size, config.rr_embedding_dim) if config.rr_embedding_dim else None
        self.teacher = CATModel(config)
        self.teacher.requires_grad_(False)
        self.post_init()
        self.teacher.load_state_dict(self.cat.state_dict())

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Also loads encoder-only folders (a `CATModel` or classifier): the teacher then starts as the student."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = info.get("missing_keys", [])
        if any(k.startswith("teacher.") for k in missing):
            model.teacher.load_state_dict(model.cat.state_dict())
            info["missing_keys"] = type(missing)(k for k in missing if not k.startswith("teacher."))
        return (model, info) if want_info else model

    # -- teacher -------------------------------------------------------------------------------------------------
    def teacher_decay(self, step: int) -> float:
        """Linear anneal from ema_decay to ema_end_decay over ema_anneal_end_step updates, then constant."""
        c = self.config
        if step >= c.ema_anneal_end_step:
            return c.ema_end_decay
        return c.ema_end_decay - (c.ema_end_decay - c.ema_decay) * (1 - step / c.ema_anneal_end_step)

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        """teacher = decay * teacher + (1 - decay) * student for trainable tensors; buffers are copied."""
        decay = self.teacher_decay(step)
        student = dict(self.cat.named_parameters())
        for name, teacher_param in self.teacher.named_parameters():
            source = student[name].detach().to(teacher_param.dtype)
            if student[name].requires_grad:
                teacher_param.lerp_(source, 1.0 - decay)
            else:
                teacher_param.copy_(source)
        student_buffers = dict(self.cat.named_buffers())
        for name, teacher_buffer in self.teacher.named_buffers():
            teacher_buffer.copy_(student_buffers[name])
        return decay

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop path
        return self

    @torch.no_grad()
    def compute_targets(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Teacher targets (B, N, D): instance-normed top-K block MLP outputs (CLS excluded), averaged, layer-normed."""
        c = self.config
        outputs = self.teacher(spectrogram.float(), output_mlp_outputs=True, return_dict=True)
        top_k = c.average_top_k_layers or c.num_hidden_layers
        layers = [t[:, c.num_extra_tokens:].float() for t in outputs.mlp_outputs[-top_k:]]
        if c.instance_norm_target_layer:
            layers = [F.instance_norm(t.transpose(1, 2), eps=c.stem_layer_norm_eps).transpose(1, 2) for t in layers]
        targets = sum(layers) / len(layers)
        if c.layer_norm_targets:
            targets = F.layer_norm(targets, targets.shape[-1:], eps=c.stem_layer_norm_eps)
        return targets

    # -- masking -------------------------------------------------------------------------------------------------
    def make_mask(self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
        """(batch_size * clone_batch, N) inverse block masks from the config (rows 4i..4i+3 belong to clip i)."""
        c = self.config
        return compute_inverse_block_mask(
            batch_size * c.clone_batch, grid, mask_ratio=c.mask_ratio, mask_length=c.mask_length,
            mask_ratio_adjust=c.mask_ratio_adjust, generator=generator, device=device,
        )

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_values: torch.Tensor,
        mask: torch.Tensor | None = None,
        rr_embeddings: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CATForPreTrainingOutput:
        r"""
        input_values: (batch, frames, mel_bins), frames a multiple of 16.
        mask: optional (batch * clone_batch, num_patches) float/bool, 1 = masked; every row must mask the same number
            of patches. Built from the config (and `generator`) when omitted.
        rr_embeddings: optional (batch, rr_embedding_dim) (or (batch, 1, dim)) external-encoder embeddings.
        """
        c = self.config
        spectrogram = _as_spectrogram(input_values, c).float()
        batch, frames = spectrogram.shape[0], spectrogram.shape[2]
        if frames % c.patch_size:
            raise ValueError(
                f"pretraining needs a length that is a multiple of {c.patch_size} frames, got {frames}; crop or pad "
                "the clips (the pretraining data pipeline does this)."
            )
        grid = (frames // c.patch_size, c.frequency_patches)
        num_patches = grid[0] * grid[1]
        rows = batch * c.clone_batch
        if mask is None:
            mask = self.make_mask(batch, grid, generator=generator, device=spectrogram.device)
        mask = mask.to(spectrogram.device).float()
        if mask.shape != (rows, num_patches):
            raise ValueError(f"mask must have shape (batch * clone_batch, num_patches) = {(rows, num_patches)}, "
                             f"got {tuple(mask.shape)}.")
        masked_counts = mask.sum(1)
        if not torch.all(masked_counts == masked_counts[0]):
            raise ValueError("every mask row must mask the same number of patches (the student batch is rectangular).")
        num_kept = num_patches - int(masked_counts[0])

        targets = self.compute_targets(spectrogram)  # (B, N, D)

        # Student on the visible tokens of every clone (kept tokens in ascending patch order).
        clones = spectrogram.repeat_interleave(c.clone_batch, dim=0)
        kept_ids = torch.sort(mask, dim=1, stable=True).indices[:, :num_kept]
        visible = self.cat.embeddings.visible_patch_tokens(clones, kept_ids)
        student = self.cat.encode(self.cat.embeddings.add_extra_tokens(visible))

        # Decoder on the full grid: encoder outputs at their patches, noise tokens elsewhere.
        decoder_input = torch.zeros(rows, num_patches, c.hidden_size, dtype=student.dtype, device=student.device)
        if self.training and c.mask_noise_std > 0:
            decoder_input.normal_(0, c.mask_noise_std, generator=generator)
        decoder_input = decoder_input * mask[..., None].to(decoder_input.dtype)
        decoder_input = decoder_input.scatter(
            1, kept_ids[..., None].expand(-1, -1, c.hidden_size), student[:, c.num_extra_tokens:].to(decoder_input.dtype)
        )
        prediction = self.decoder(decoder_input, grid)

        repeated_targets = targets.repeat_interleave(c.clone_batch, dim=0)
        sample_size = int(mask.sum().item())
        masked = mask.bool()
        frame_sum = self._regression(prediction[masked], repeated_targets[masked]).sum()
        cls = student[:, c.num_extra_tokens - 1]  # the utterance token: the original's x[:, extra_tokens - 1]
        # The original sums the frame errors and sample_size-scaled CLS / RR errors, then divides everything by
        # sample_size: per-patch mean for the frame loss, plain sums for the clip-level losses.
        frame_loss = frame_sum / sample_size
        utterance_loss = self._regression(cls, repeated_targets.mean(dim=1)).sum()
        loss = c.frame_loss_weight * frame_loss + c.utterance_loss_weight * utterance_loss
        rr_loss = None
        if rr_embeddings is not None:
            if self.rr_projector is None:
                raise ValueError("rr_embeddings were given but the config has rr_embedding_dim=None; set "
                                 "rr_embedding_dim to the external encoder's embedding size.")
            rr_embeddings = rr_embeddings.reshape(batch, -1).to(cls.dtype)
            if rr_embeddings.shape[-1] != c.rr_embedding_dim:
                raise ValueError(
                    f"rr_embeddings have size {rr_embeddings.shape[-1]} but config.rr_embedding_dim is "
                    f"{c.rr_embedding_dim}; set rr_embedding_dim to the external encoder's embedding size."
                )
            if c.rr_view == "full":
                # the whole clip through the student, once per clip, as a probe or a classifier will see it; the sum
                # is scaled to the masked view's B * clone_batch rows, so rr_loss_weight means the same
                hidden = self.cat(spectrogram, return_dict=True).last_hidden_state
                rr_rows, rr_target, scale = hidden, rr_embeddings, c.clone_batch
            else:
                rr_rows, rr_target, scale = student, rr_embeddings.repeat_interleave(c.clone_batch, dim=0), 1
            pooled = rr_rows[:, c.num_extra_tokens - 1] if c.rr_pooling == "cls" else \
                rr_rows[:, c.num_extra_tokens:].mean(dim=1)
            rr_loss = scale * self._rr_loss(self.rr_projector(pooled), rr_target).sum()
            loss = loss + c.rr_loss_weight * rr_loss
        return CATForPreTrainingOutput(
            loss=loss, frame_loss=frame_loss, utterance_loss=utterance_loss, rr_loss=rr_loss,
            sample_size=sample_size, targets=targets, student_hidden_state=student, decoder_output=prediction,
            mask=mask,
        )

    @staticmethod
    def _regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """data2vec's element-wise loss: squared error scaled by 1/sqrt(dim)."""
        return (prediction.float() - target.float()).pow(2) / math.sqrt(prediction.shape[-1])

    def _rr_loss(self, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind = self.config.rr_loss_type
        if kind == "mse":
            return self._regression(projected, target)
        if kind == "l1":
            return (projected.float() - target.float()).abs() / math.sqrt(projected.shape[-1])
        return 1.0 - F.cosine_similarity(projected.float(), target.float(), dim=-1)


__all__ = [
    "CATPreTrainedModel",
    "CATModel",
    "CATForAudioClassification",
    "CATForAudioFrameClassification",
    "CATForPreTraining",
    "CATModelOutput",
    "CATFrameClassifierOutput",
    "CATForPreTrainingOutput",
    "compute_inverse_block_mask",
    "sincos_position_table",
]
