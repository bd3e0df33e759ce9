# Copyright 2025 The cat-hf developers. Licensed under the Apache License, Version 2.0.
"""CAT model configuration.

Every architecture choice of the authors' code is a field here, named as transformers names it, so that a
converted checkpoint and a model trained with this package describe themselves the same way. The
pretraining fields (masking, decoder, teacher, Representation Regularization) live here too: they are the
single source of truth that the mask generator, `CATForPreTraining` and the training recipes read.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2CLS


#: The Representation Regularization losses (the original's clap_loss_type values this package implements).
RRLossType = Literal["mse", "cosine", "l1"]

# Named architectures. cat-base is the paper's main model (88.8 M parameters with the multi-resolution stem).
CAT_PRESETS: dict[str, dict] = {
    # A CPU-sized model for the demo, tests and the tiny recipes.
    "cat-tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                     stem_channels=[64, 128], stem_depths=[1, 1]),
    # The others have the paper's stem: CATConfig's default stem_channels and stem_depths.
    "cat-small": dict(hidden_size=384, num_hidden_layers=11, num_attention_heads=6),
    "cat-base": dict(hidden_size=768, num_hidden_layers=11, num_attention_heads=12),
    "cat-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


@strict
class CATConfig(PreTrainedConfig):
    r"""
    Configuration of a CAT (Convolutional Audio Transformer) encoder, its classifier and its pretraining model.

    Input: log-mel spectrograms of shape (batch, frames, `num_mel_bins`) cut into `patch_size` x `patch_size`
    patches, flattened time-major (token `8 t + f` for 128 mel bins).

    Args:
        hidden_size: width D of the transformer.
        num_hidden_layers: number of post-LN transformer blocks.
        num_attention_heads: attention heads; must divide `hidden_size`.
        mlp_ratio: MLP width of the blocks as a multiple of `hidden_size`.
        hidden_act: activation of the blocks' MLP, a name of transformers' `ACT2FN` ("gelu", exact, in every CAT
            checkpoint; the stem and the pretraining decoder keep the authors' GELU).
        layer_norm_eps: eps of the context LayerNorm and the blocks (1e-6).
        classifier_norm_eps: eps of the classifier's fc_norm (1e-6; the original fixes it whatever `norm_eps`).
        stem_layer_norm_eps: eps of every LayerNorm in the convolutional stem, the decoder and the target
            normalisation (1e-5, PyTorch's default, as in the original).
        stem_type: "multires" (the paper's multi-resolution convolutional stem) or "patch" (the EAT-style single
            16x16 convolution).
        stem_strides: per-stage downsampling of the multi-resolution stem; their product is `patch_size`.
            The paper's stem is [4, 2, 2]: stages at resolutions 4, 8 and 16.
        stem_channels: channels of every stage but the last (the last has `hidden_size`).
        stem_depths: CBlocks after every stage but the last.
        stem_mlp_ratio: MLP width of the CBlocks as a multiple of their channels.
        stem_kernel_size: kernel of the CBlocks' depthwise convolution.
        patch_size: side of the square patches (token grid stride), 16.
        num_mel_bins: frequency bins of the input.
        num_extra_tokens: learned tokens prepended to the patches. Classification pools token 0 (CLS); the
            pretraining utterance and RR losses use the last one (the same token when there is one, as in CAT).
        max_time_patches: time patches covered by the fixed sin-cos positional table (768 -> 12288 frames): the
            longest input of one forward pass (`max_frames`).
        frame_shift_ms / frame_length_ms: hop and window of the input's fbank frames (Kaldi's 10 / 25 ms, as
            CATFeatureExtractor makes them for every CAT checkpoint). They place the model's outputs in time: see
            the time grid below.
        window_frames / window_hop_frames: how `CATForAudioClassification` scores, in eval mode, an input longer
            than `window_frames` (None: it does not; the input runs in one pass): windows of `window_frames` frames
            every `window_hop_frames` (None: half a window), the last one ending at the clip's last real frame;
            their probabilities (softmax, or sigmoid for multi-label) are averaged, or max-pooled for multi-label,
            and returned as logits of those probabilities. `cat-hf finetune` sets it to its training length, so
            `pipeline` on a long clip gives what `cat-hf evaluate` / `predict` give (`window_starts`).
        frame_label_hop_ms: hop of `CATForAudioFrameClassification`'s label grid; None is one time patch (160 ms).
            A finer hop (80, 40, 20, 10 ms: one that divides the patch hop) repeats each patch's logits.
        pooling: "cls" (the original's CLS_TOKEN mode), "mean" (mean of the patch tokens, MEAN_POOLING) or
            "lin_softmax" (LIN_SOFTMAX: per channel, sigmoid probabilities of the patch tokens pooled as
            sum(p^2) / sum(p) and returned as a logit).
        use_fc_norm: LayerNorm before the classification head.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
        attention_dropout / hidden_dropout: dropout in attention probabilities and after projections.
        initializer_range: std of the truncated-normal init of linear layers.
        mask_ratio, mask_length, mask_ratio_adjust, clone_batch, mask_noise_std: inverse block masking of
            pretraining (ratio of masked tokens, block side, over-sampling of block centres, masked copies per
            clip, std of the decoder's noise tokens).
        decoder_layers, decoder_kernel_size, decoder_groups: the 2-D CNN decoder of pretraining.
        average_top_k_layers: teacher blocks averaged into the targets (None: all blocks).
        instance_norm_target_layer / layer_norm_targets: normalisation of teacher targets.
        frame_loss_weight / utterance_loss_weight: weights of the masked-frame regression and the CLS loss.
        rr_embedding_dim: size of the external encoder's embedding for Representation Regularization
            (None: no RR projector).
        rr_loss_type: "mse", "cosine" or "l1". rr_loss_weight: its weight. rr_pooling: what is projected onto the
            external embedding: "cls", the utterance token (the paper), or "mean", the mean of the student's visible
            patch tokens (what a mean-pooled probe reads). rr_view: "masked", the student's masked clones (the
            paper), or "full", one extra pass of the whole clip through the student, the view a probe or a
            classifier has (small-scale distillation learns the teacher faster from it).
        ema_decay, ema_end_decay, ema_anneal_end_step: teacher decay rises linearly from `ema_decay` to
            `ema_end_decay` over `ema_anneal_end_step` updates, then holds.

    Time grid (the one place where the model's outputs are placed in time; times in ms from the first input sample):
        `time_patch_hop_ms` (160): one time patch, `patch_size` frames; `time_patch_centre_ms(t)`: centre of the
        samples time patch t reads (87.5 + 160 t); `max_frames` / `max_time_patches`: the longest single pass;
        `frame_label_repeats` and `frame_label_centre_ms(k)`: the frame head's label grid.
    """

    model_type = "cat"

    hidden_size: int = 768
    num_hidden_layers: int = 11
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    stem_layer_norm_eps: float = 1e-5
    stem_type: Literal["multires", "patch"] = "multires"
    stem_strides: list[int] | None = None
    stem_channels: list[int] | None = None
    stem_depths: list[int] | None = None
    stem_mlp_ratio: float = 4.0
    stem_kernel_size: int = 5
    patch_size: int = 16
    num_mel_bins: int = 128
    num_extra_tokens: int = 1
    max_time_patches: int = 768
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    frame_label_hop_ms: float | None = None
    window_frames: int | None = None
    window_hop_frames: int | None = None
    pooling: Literal["cls", "mean", "lin_softmax"] = "cls"
    use_fc_norm: bool = True
    classifier_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    # pretraining
    mask_ratio: float = 0.8
    mask_length: int = 5
    mask_ratio_adjust: float = 0.07
    clone_batch: int = 4
    mask_noise_std: float = 0.01
    decoder_layers: int = 6
    decoder_kernel_size: int = 3
    decoder_groups: int = 16
    average_top_k_layers: int | None = None
    instance_norm_target_layer: bool = True
    layer_norm_targets: bool = True
    frame_loss_weight: float = 1.0
    utterance_loss_weight: float = 1.0
    rr_embedding_dim: int | None = 512
    rr_loss_type: RRLossType = "mse"
    rr_loss_weight: float = 1.0
    rr_pooling: Literal["cls", "mean"] = "cls"
    rr_view: Literal["masked", "full"] = "masked"
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100000

    def __post_init__(self, **kwargs):
        if self.stem_strides is None:
            self.stem_strides = [4, 2, 2]
        if self.stem_channels is None:
            self.stem_channels = [256, 384]
        if self.stem_depths is None:
            self.stem_depths = [2, 2]
        self.stem_strides = [int(s) for s in self.stem_strides]
        self.stem_channels = [int(c) for c in self.stem_channels]
        self.stem_depths = [int(d) for d in self.stem_depths]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject inconsistent architectures with a message that says which field to change."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "num_mel_bins",
                     "max_time_patches", "stem_kernel_size", "clone_batch", "decoder_layers", "decoder_kernel_size",
                     "decoder_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(
                f"problem_type={self.problem_type!r} is not one of transformers' 'single_label_classification', "
                "'multi_label_classification', 'regression' (or None: inferred from the labels' shape and dtype)."
            )
        for name, allowed in (("stem_type", ("multires", "patch")), ("pooling", ("cls", "mean", "lin_softmax")),
                              ("rr_loss_type", get_args(RRLossType)), ("rr_pooling", ("cls", "mean")),
                              ("rr_view", ("masked", "full"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {allowed}.")
        for size, parts in (("hidden_size", "num_attention_heads"), ("num_mel_bins", "patch_size"),
                            ("hidden_size", "decoder_groups")):
            if getattr(self, size) % getattr(self, parts) != 0:
                raise ValueError(f"{size} ({getattr(self, size)}) is not divisible by {parts} "
                                 f"({getattr(self, parts)}); choose values where {parts} divides {size}.")
        if self.stem_type == "multires":
            stages = len(self.stem_strides)
            if stages < 1:
                raise ValueError("stem_strides is empty; give at least one stage (the paper's stem is [4, 2, 2]).")
            if math.prod(self.stem_strides) != self.patch_size:
                raise ValueError(
                    f"stem_strides {self.stem_strides} multiply to {math.prod(self.stem_strides)}, "
                    f"but must multiply to patch_size ({self.patch_size})."
                )
            for name in ("stem_channels", "stem_depths"):
                value = getattr(self, name)
                if len(value) != stages - 1:
                    raise ValueError(
                        f"{name} {value} has {len(value)} entries but stem_strides {self.stem_strides} has "
                        f"{stages} stages: give one entry per stage except the last ({stages - 1})."
                    )
            if any(c <= 0 for c in self.stem_channels) or any(d < 0 for d in self.stem_depths):
                raise ValueError(f"stem_channels must be positive and stem_depths non-negative, got "
                                 f"{self.stem_channels} and {self.stem_depths}.")
        if self.hidden_act not in ACT2CLS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not an activation of transformers' ACT2FN; use one of "
                             f"{sorted(ACT2CLS)} (CAT checkpoints use 'gelu').")
        if not (self.frame_shift_ms > 0 and self.frame_length_ms > 0):
            raise ValueError(f"frame_shift_ms and frame_length_ms must be positive, got {self.frame_shift_ms} and "
                             f"{self.frame_length_ms}.")
        if self.frame_label_hop_ms is not None:
            repeats = self.time_patch_hop_ms / self.frame_label_hop_ms if self.frame_label_hop_ms > 0 else 0
            if repeats < 1 or not math.isclose(repeats, round(repeats)):
                raise ValueError(
                    f"frame_label_hop_ms={self.frame_label_hop_ms} does not divide the {self.time_patch_hop_ms:g} ms "
                    f"time patch; use one that does (e.g. {self.time_patch_hop_ms / 4:g} or "
                    f"{self.time_patch_hop_ms / 16:g}), or None for one label frame per patch."
                )
        if self.window_frames is not None:
            if not self.patch_size <= self.window_frames <= self.max_frames:
                raise ValueError(f"window_frames={self.window_frames} must be between one patch ({self.patch_size}) and "
                                 f"max_frames ({self.max_frames}), or None for one pass over the whole input.")
            hop = self.window_hop_frames
            if hop is not None and not 1 <= hop <= self.window_frames:
                raise ValueError(f"window_hop_frames={hop} must be between 1 and window_frames "
                                 f"({self.window_frames}) (a larger hop would skip audio), or None for half a window.")
        if self.num_extra_tokens < 1:
            raise ValueError("num_extra_tokens must be >= 1: the CLS (utterance) token is one of them.")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}.")
        if self.mask_length < 1:
            raise ValueError(f"mask_length must be >= 1, got {self.mask_length}.")
        if self.average_top_k_layers is not None and not 1 <= self.average_top_k_layers <= self.num_hidden_layers:
            raise ValueError(
                f"average_top_k_layers ({self.average_top_k_layers}) must be between 1 and num_hidden_layers "
                f"({self.num_hidden_layers}), or None for all blocks."
            )

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def frequency_patches(self) -> int:
        return self.num_mel_bins // self.patch_size

    @property
    def max_frames(self) -> int:
        """Longest input (in frames) the positional table covers: the longest single forward pass."""
        return self.max_time_patches * self.patch_size

    # -- time grid ---------------------------------------------------------------------------------------------------
    @property
    def time_patch_hop_ms(self) -> float:
        """Time between consecutive time patches (token rows): `patch_size` frames, 160 ms."""
        return self.patch_size * self.frame_shift_ms

    def time_patch_centre_ms(self, index):
        """Centre of the samples that time patch `index` (int, float or tensor) reads, in ms from the first sample of
        the input: frames 16 t .. 16 t + 15 span 160 t .. 160 t + 175 ms, so 87.5 + 160 t."""
        return index * self.time_patch_hop_ms + ((self.patch_size - 1) * self.frame_shift_ms + self.frame_length_ms) / 2

    @property
    def frame_label_repeats(self) -> int:
        """Label frames per time patch of `CATForAudioFrameClassification` (1 without `frame_label_hop_ms`)."""
        return 1 if self.frame_label_hop_ms is None else round(self.time_patch_hop_ms / self.frame_label_hop_ms)

    def frame_label_centre_ms(self, index):
        """Centre of label frame `index` of the frame head, in ms from the first input sample: a time patch's hop
        interval (its centre +- 80 ms) cut into `frame_label_repeats` equal frames."""
        hop = self.time_patch_hop_ms / self.frame_label_repeats
        return self.time_patch_centre_ms(0) - self.time_patch_hop_ms / 2 + (index + 0.5) * hop

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CATConfig":
        """A named architecture (`cat-tiny`, `cat-small`, `cat-base`, `cat-large`) with optional overrides."""
        if name not in CAT_PRESETS:
            raise ValueError(f"Unknown CAT preset {name!r}; choose one of {sorted(CAT_PRESETS)}.")
        return cls(**{**CAT_PRESETS[name], **overrides})


__all__ = ["CATConfig", "CAT_PRESETS"]
