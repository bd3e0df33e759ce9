"""Convert the authors' fairseq CAT checkpoints into Hugging Face folders.

Reads pretraining checkpoints (student in fp16, EMA teacher under `model["_ema"]`) and finetuning checkpoints
(backbone under `model.`, plus `fc_norm` and `head`), of either stem (multi-resolution or EAT-style single patch),
any width and depth, with `torch.load(weights_only=True)`: fairseq is not needed. The architecture is read from the
checkpoint's `cfg` and from the weights' shapes; the feature extractor's statistics and target length from its
task config. The output folder is written under a temporary name and renamed, so a failure leaves nothing behind.

What is read is checked before it is trusted: the CRC-32 of every member of the checkpoint's zip archive (a flipped
byte fails it; torch.load does not look), and the converted weights for NaN, infinity and magnitudes no trained
model has (beyond the float16 range), besides the key and shape checks against the inferred architecture.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from transformers.utils import logging

from .audio import DEFAULT_SAMPLING_RATE
from .configuration_cat import CATConfig, RRLossType
from .feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor
from .files import apply_default_modes, damaged_tensors, zip_damage
from .modeling_cat import CATForAudioClassification, CATForPreTraining, CATModel

logger = logging.get_logger(__name__)


class CheckpointConversionError(ValueError):
    """The file is not a CAT checkpoint this converter understands, or its weights do not fit the architecture."""


_ENCODER = "modality_encoders.IMAGE."
# The original finetuning model's prediction_mode -> CATConfig.pooling.
_POOLING_OF_MODE = {"CLS_TOKEN": "cls", "MEAN_POOLING": "mean", "LIN_SOFTMAX": "lin_softmax"}
# Original key (relative to the modality encoder) -> our key (relative to CATModel.embeddings).
_EMBEDDING_RULES = [
    (r"extra_tokens", "cls_token"),
    (r"fixed_positional_encoder\.positions", "position_embeddings"),
    (r"context_encoder\.norm\.(weight|bias)", r"context_norm.\1"),
    (r"local_encoder\.proj\.(weight|bias)", r"stem.proj.\1"),
    (r"patch_embed\.(\d+)\.proj\.(weight|bias)", r"stem.downsamples.\1.conv.\2"),
    (r"patch_embed\.(\d+)\.norm\.(weight|bias)", r"stem.downsamples.\1.norm.\2"),
    (r"patch_embed\.(\d+)\.(weight|bias)", r"stem.token_proj.\2"),  # the Linear after the last stage
    (r"conv_blocks\.(\d+)\.(\d+)\.norm1\.(weight|bias)", r"stem.blocks.\1.\2.norm1.\3"),
    (r"conv_blocks\.(\d+)\.(\d+)\.conv1\.(weight|bias)", r"stem.blocks.\1.\2.pw_in.\3"),
    (r"conv_blocks\.(\d+)\.(\d+)\.attn\.(weight|bias)", r"stem.blocks.\1.\2.dw_conv.\3"),
    (r"conv_blocks\.(\d+)\.(\d+)\.conv2\.(weight|bias)", r"stem.blocks.\1.\2.pw_out.\3"),
    (r"conv_blocks\.(\d+)\.(\d+)\.norm2\.(weight|bias)", r"stem.blocks.\1.\2.norm2.\3"),
    (r"conv_blocks\.(\d+)\.(\d+)\.mlp\.fc1\.(weight|bias)", r"stem.blocks.\1.\2.mlp_in.\3"),
    (r"conv_blocks\.(\d+)\.(\d+)\.mlp\.fc2\.(weight|bias)", r"stem.blocks.\1.\2.mlp_out.\3"),
    (r"stage_output_decode\.(\d+)\.(weight|bias)", r"stem.stage_projections.\1.\2"),
]
_BLOCK_RULES = [
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"layers.\1.norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"layers.\1.norm2.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"layers.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"layers.\1.mlp.fc1.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"layers.\1.mlp.fc2.\2"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_DECODER_RULES = [
    (r"decoder\.blocks\.(\d+)\.0\.(weight|bias)", r"decoder.convs.\1.\2"),
    (r"decoder\.proj\.(weight|bias)", r"decoder.proj.\1"),
]


def _inverted(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The renaming rules backwards (our name -> the original's), so that errors name the checkpoint's keys. A group
    that our name drops (the stage number of ``patch_embed.N.weight``) comes back as ``N``."""
    inverse = []
    for pattern, replacement in rules:
        groups = re.findall(r"\([^)]*\)", pattern)
        parts = re.split(r"\\(\d)", replacement)  # literal, group number, literal, ...
        used = [int(n) for n in parts[1::2]]
        if used != sorted(set(used)):
            raise AssertionError(f"rule {pattern!r} -> {replacement!r} must use its groups in order")
        numbers = iter(f"\\{used.index(i) + 1}" if i in used else "N" for i in range(1, len(groups) + 1))
        inverse.append((
            "".join(re.escape(part) if i % 2 == 0 else groups[int(part) - 1] for i, part in enumerate(parts)),
            re.sub(r"\([^)]*\)", lambda _, numbers=numbers: next(numbers), pattern).replace("\\.", "."),
        ))
    return inverse


_ORIGINAL_EMBEDDINGS, _ORIGINAL_BLOCKS = _inverted(_EMBEDDING_RULES), _inverted(_BLOCK_RULES)
_ORIGINAL_DECODER = _inverted(_DECODER_RULES)
_HEADS = {"fc_norm.weight": "fc_norm.weight", "fc_norm.bias": "fc_norm.bias",
          "head.weight": "classifier.weight", "head.bias": "classifier.bias"}  # fmt: skip


def _original_key(key: str, prefix: str = "") -> str:
    """The checkpoint's name for one of our state-dict keys (`prefix`: "model." in finetuning checkpoints), e.g.
    ``cat.layers.1.attention.q_proj.weight`` -> ``blocks.1.attn.qkv.weight``; the key itself if none applies."""
    def encoder_key(name: str) -> str | None:
        if name.startswith("embeddings."):
            found = _rename(name[len("embeddings."):], _ORIGINAL_EMBEDDINGS)
            return _ENCODER + found if found else None
        if m := re.fullmatch(r"layers\.(\d+)\.attention\.[qkv]_proj\.(weight|bias)", name):
            return f"blocks.{m.group(1)}.attn.qkv.{m.group(2)}"
        return _rename(name, _ORIGINAL_BLOCKS)

    if key.startswith("cat."):
        found = encoder_key(key[len("cat."):])
        found = prefix + found if found else None
    elif key.startswith("teacher."):
        found = encoder_key(key[len("teacher."):])
        found = f"model['_ema'] {found}" if found else None
    elif key.startswith("decoder."):
        found = _rename(key, _ORIGINAL_DECODER)
        found = _ENCODER + found if found else None
    elif key.startswith("rr_projector."):
        found = "clap_proj." + key[len("rr_projector."):]
    else:
        found = {ours: theirs for theirs, ours in _HEADS.items()}.get(key)
    return found or key


def load_original_checkpoint(path: str | os.PathLike) -> dict:
    """Load a fairseq checkpoint without fairseq, and check that it looks like one of CAT's."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointConversionError(f"{path} does not exist or is not a file.")
    damage = zip_damage(path)  # torch's zip format stores a CRC-32 per member; torch.load does not check them
    if damage:
        raise CheckpointConversionError(
            f"{path} is damaged: {damage}. The file changed after it was written (a bad copy or download, or a "
            "failing disk); copy or download it again."
        )
    try:
        checkpoint = _load_weights_only(path)
    except CheckpointConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - any other unpickling failure means the same thing here
        raise CheckpointConversionError(
            f"{path} is not a checkpoint torch.load(weights_only=True) can read ({type(error).__name__}: {error}). "
            "Pass the .pt file written by the authors' fairseq trainer."
        ) from error
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointConversionError(
            f"{path} holds a bare state dict ({len(checkpoint)} tensors, e.g. {next(iter(checkpoint))!r}), without the "
            "'cfg' the architecture is read from. Pass the whole checkpoint the authors' fairseq trainer saved (with "
            "'model' and 'cfg'), not its weights alone."
        )
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "cfg" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointConversionError(
            f"{path} is not a fairseq CAT checkpoint: expected a dict with 'model' and 'cfg', found {found}."
        )
    if not isinstance(checkpoint["cfg"], dict) or "model" not in checkpoint["cfg"]:
        raise CheckpointConversionError(f"{path}: checkpoint['cfg'] has no 'model' section; cannot infer the config.")
    return checkpoint


def _numpy_data_global(name: str):
    """The numpy scalar, array or dtype constructor pickled under `name`, or None for anything else.

    fairseq stores validation metrics (e.g. the best mAP, a numpy float64) next to the weights. These are data, so
    they may be unpickled under weights_only; numpy 1.x pickles them under `numpy.core`, numpy 2.x under
    `numpy._core`, and either name is resolved to the installed numpy.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    module, _, attribute = name.rpartition(".")
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and attribute in ("scalar", "_reconstruct"):
        return getattr(multiarray, attribute)
    if name in ("numpy.ndarray", "numpy.dtype"):
        return getattr(np, attribute)
    if module == "numpy.dtypes":
        candidate = getattr(np.dtypes, attribute, None)
        return candidate if isinstance(candidate, type) and issubclass(candidate, np.dtype) else None
    return None


def _load_weights_only(path: Path) -> dict:
    """torch.load(weights_only=True), also accepting the numpy scalars and arrays that fairseq's trainer saves."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        blocked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        refused = [name for name in blocked if _numpy_data_global(name) is None]
        if refused or not blocked:
            raise CheckpointConversionError(
                f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle: {refused or blocked}. "
                "A checkpoint written by the authors' fairseq trainer holds only tensors, numbers, strings and numpy "
                "values; load this file yourself (only if you trust it), keep its 'cfg', 'model' and 'task_state' "
                "entries and torch.save them again."
            ) from None
        # The dtype classes (numpy.dtypes.Float64DType, ...) are only met while unpickling, so all are allowed.
        dtype_classes = [f"numpy.dtypes.{name}" for name in dir(np.dtypes) if name.endswith("DType")]
        allowed = {name: _numpy_data_global(name) for name in [*blocked, *dtype_classes]}
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items() if obj is not None]):
            return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_kind(checkpoint: dict) -> str:
    keys = checkpoint["model"].keys()
    if any(k.startswith("model." + _ENCODER) for k in keys):
        return "finetuning"
    if any(k.startswith(_ENCODER) for k in keys):
        return "pretraining"
    raise CheckpointConversionError(
        f"no '{_ENCODER}*' weights found (first keys: {list(keys)[:5]}); this is not a CAT/EAT checkpoint."
    )


def _pretraining_model_cfg(checkpoint: dict, kind: str) -> dict:
    cfg = checkpoint["cfg"]["model"]
    if kind == "finetuning":
        args = cfg.get("pretrained_model_args") or {}
        model_cfg = args.get("model", args)
        if not model_cfg:
            raise CheckpointConversionError("finetuning checkpoint without cfg.model.pretrained_model_args.")
        if cfg.get("add_bottleneck") is not None and "add_bottleneck" in model_cfg:
            model_cfg = {**model_cfg, "add_bottleneck": cfg["add_bottleneck"]}  # the finetuning run's own setting
        return model_cfg
    return cfg


def _image_cfg(model_cfg: dict) -> dict:
    return (model_cfg.get("modalities") or {}).get("image") or {}


def _rr_projector_kept(model_cfg: dict) -> bool:
    """Whether clap_proj maps the model's CLS onto the external embedding (proj_type 2, 4, 6), the RR head we
    implement. The odd proj_types project the other way (such a projector is left out of the conversion); without a
    proj_type the original builds none."""
    proj_type = int(model_cfg.get("proj_type") or 0)
    return proj_type > 0 and proj_type % 2 == 0


def _rr_trained(model_cfg: dict) -> bool:
    """The original adds the RR loss only with a proj_type and a positive clap_loss."""
    return bool(model_cfg.get("proj_type")) and float(model_cfg.get("clap_loss") or 0) > 0


def _check_supported(model_cfg: dict, kind: str) -> None:
    """Refuse, by name, what this package cannot represent; warn about pretraining-objective settings it does not
    implement (they change no weight and no encoder output, only what continued pretraining would optimise)."""
    missing = [name for name in ("embed_dim", "depth", "num_heads") if name not in model_cfg]
    if missing:
        raise CheckpointConversionError(f"the checkpoint's model cfg lacks {missing}; cannot infer the architecture.")
    refused = {  # change the encoder itself
        "layer_norm_first": "pre-LN blocks are not CAT/EAT",
        "add_bottleneck": f"a {model_cfg.get('bottleneck_dim', 128)}-d linear bottleneck before the transformer blocks",
    }
    for name, what in refused.items():
        if model_cfg.get(name):
            raise CheckpointConversionError(f"{name}={model_cfg[name]!r} ({what}) is not supported by this converter.")
    if kind == "finetuning":  # the original drops the decoder, the EMA teacher and the losses for finetuning
        return
    decoder = _image_cfg(model_cfg).get("decoder") or {}
    if decoder.get("decoder_dim", model_cfg["embed_dim"]) != model_cfg["embed_dim"]:
        raise CheckpointConversionError(
            f"decoder_dim {decoder['decoder_dim']} != embed_dim {model_cfg['embed_dim']}: this pretraining decoder "
            "cannot be converted (the finetuning checkpoints of this model can)."
        )
    objective = {name: model_cfg[name] for name in ("loss_beta", "end_of_block_targets", "clap_loss_layer",
                                                     "dispersive_loss") if model_cfg.get(name)}
    if _rr_trained(model_cfg):  # the RR settings only matter where RR was trained
        if str(model_cfg.get("clap_loss_type", "mse")) not in get_args(RRLossType):
            objective["clap_loss_type"] = model_cfg["clap_loss_type"]
        if not _rr_projector_kept(model_cfg):
            objective["proj_type"] = model_cfg["proj_type"]
    if objective:
        logger.warning(
            f"{objective}: pretraining-objective settings that cat_hf does not implement. The encoder and the teacher "
            "are converted exactly; continued pretraining with cat_hf uses MSE targets from the blocks' MLP outputs "
            f"and applies RR ({'/'.join(get_args(RRLossType))}) to the final CLS token projected onto the external "
            "embedding, so it optimises another objective than the original run."
        )


def config_from_checkpoint(checkpoint: dict, kind: str, state: dict) -> CATConfig:
    """Build the CATConfig from the checkpoint's cfg, with the stem read off the weights' shapes."""
    model_cfg = _pretraining_model_cfg(checkpoint, kind)
    image = _image_cfg(model_cfg)
    decoder = image.get("decoder") or {}
    _check_supported(model_cfg, kind)
    rr_kept = _rr_projector_kept(model_cfg)
    rr_used = _rr_trained(model_cfg) and rr_kept
    rr_type = str(model_cfg.get("clap_loss_type", "mse"))

    hidden = int(model_cfg["embed_dim"])
    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=int(model_cfg["depth"]),
        num_attention_heads=int(model_cfg["num_heads"]),
        mlp_ratio=float(model_cfg.get("mlp_ratio", 4.0)),
        layer_norm_eps=float(model_cfg.get("norm_eps", 1e-6)),
        num_extra_tokens=int(image.get("num_extra_tokens", 1)),
        patch_size=int(image.get("patch_size", 16)),
        mask_ratio=float(image.get("mask_prob", 0.8)),
        mask_length=int(image.get("mask_length", 5)),
        mask_ratio_adjust=float(image.get("mask_prob_adjust", 0.07)),
        mask_noise_std=float(image.get("mask_noise_std", 0.01)),
        clone_batch=int(model_cfg.get("clone_batch", 1)),
        decoder_layers=int(decoder.get("decoder_layers", 6)),
        decoder_kernel_size=int(decoder.get("decoder_kernel", 3)),
        decoder_groups=int(decoder.get("decoder_groups", 16)),
        # The original averages y[-k:], which is every block when k exceeds the depth.
        average_top_k_layers=min(int(model_cfg.get("average_top_k_layers") or model_cfg["depth"]),
                                 int(model_cfg["depth"])),
        instance_norm_target_layer=bool(model_cfg.get("instance_norm_target_layer", True)),
        layer_norm_targets=bool(model_cfg.get("layer_norm_targets", True)),
        frame_loss_weight=float(model_cfg.get("d2v_loss", 1.0)),
        utterance_loss_weight=float(model_cfg.get("cls_loss", 1.0)),
        rr_loss_weight=float(model_cfg.get("clap_loss", 0.0)) if rr_used else 0.0,
        rr_loss_type=rr_type if rr_used and rr_type in get_args(RRLossType) else "mse",
        ema_decay=float(model_cfg.get("ema_decay", 0.9998)),
        ema_end_decay=float(model_cfg.get("ema_end_decay", 0.99999)),
        ema_anneal_end_step=int(model_cfg.get("ema_anneal_end_step", 100000)),
        drop_path_rate=float(model_cfg.get("end_drop_path_rate", 0.0)),
    )

    prefix = ("model." if kind == "finetuning" else "") + _ENCODER
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    positions = encoder.get("fixed_positional_encoder.positions")
    if positions is None:
        raise CheckpointConversionError("missing key 'modality_encoders.IMAGE.fixed_positional_encoder.positions'.")
    if "local_encoder.0.proj.weight" in encoder:  # the original's Sequential(PatchEmbed, Linear)
        raise CheckpointConversionError(
            f"modalities.image.embed_dim {image.get('embed_dim')} != embed_dim {hidden}: a patch stem of that width "
            "followed by a Linear to the model's width (local_encoder.0 / local_encoder.1) is not supported."
        )
    if "local_encoder.proj.weight" in encoder:
        fields["stem_type"] = "patch"
        fields["patch_size"] = int(encoder["local_encoder.proj.weight"].shape[-1])
    else:
        stages = sorted({int(m.group(1)) for k in encoder if (m := re.match(r"patch_embed\.(\d+)\.proj\.weight", k))})
        if not stages:
            raise CheckpointConversionError("neither a multi-resolution stem (patch_embed.*) nor a patch stem "
                                            "(local_encoder.proj) found in the checkpoint.")
        weights = [encoder[f"patch_embed.{i}.proj.weight"] for i in stages]
        fields["stem_type"] = "multires"
        fields["stem_strides"] = [int(w.shape[-1]) for w in weights]
        # The tokens' grid is the last stage's. The cfg's patch_size stays 16 for the conv_option ablations whose
        # last stage is at 8 or 32; there it only sizes the positional table, which the tokens take in order.
        fields["patch_size"] = math.prod(fields["stem_strides"])
        fields["stem_channels"] = [int(w.shape[0]) for w in weights[:-1]]
        fields["stem_depths"] = [
            len({int(m.group(1)) for k in encoder if (m := re.match(rf"conv_blocks\.{i}\.(\d+)\.", k))})
            for i in stages[:-1]
        ]
        first_block = encoder.get("conv_blocks.0.0.mlp.fc1.weight")
        if first_block is not None:
            fields["stem_mlp_ratio"] = first_block.shape[0] / first_block.shape[1]
            fields["stem_kernel_size"] = int(encoder["conv_blocks.0.0.attn.weight"].shape[-1])
    frequency_patches = 128 // fields["patch_size"]
    if positions.shape[1] % frequency_patches:
        raise CheckpointConversionError(
            f"the positional table has {positions.shape[1]} rows, not a whole number of time steps of "
            f"{frequency_patches} frequency patches ({fields['patch_size']}-bin patches of 128 mel bins)."
        )
    fields["max_time_patches"] = positions.shape[1] // frequency_patches
    rr = state.get("clap_proj.weight", state.get("model.clap_proj.weight"))
    fields["rr_embedding_dim"] = int(rr.shape[0]) if rr is not None and rr_kept else None

    if kind == "finetuning":
        ft = checkpoint["cfg"]["model"]
        mode = str(ft.get("prediction_mode", "CLS_TOKEN")).split(".")[-1]
        if mode not in _POOLING_OF_MODE:
            raise CheckpointConversionError(
                f"prediction_mode {mode} is not supported ({', '.join(_POOLING_OF_MODE)} are; the original marks the "
                "CLAP_TYPE modes as unused)."
            )
        if int(ft.get("linear_layer") or 0) != 0:
            raise CheckpointConversionError(
                f"linear_layer={ft['linear_layer']}: this classifier reads block {ft['linear_layer']}'s MLP output "
                "instead of the last block's; only linear_layer=0 (the last block) is supported."
            )
        num_classes = int(ft["num_classes"])
        id2label = _labels(checkpoint, num_classes)
        # The original trains with softmax cross-entropy unless audio_mae is set without esc50_eval/spcv2_eval.
        multi_label = bool(ft.get("audio_mae")) and not (ft.get("esc50_eval") or ft.get("spcv2_eval"))
        fields.update(
            pooling=_POOLING_OF_MODE[mode],
            use_fc_norm=bool(ft.get("use_fc_norm", True)),
            drop_path_rate=float(ft.get("drop_path_rate", 0.0)),
            id2label=id2label,
            label2id={name: i for i, name in id2label.items()},
            problem_type="multi_label_classification" if multi_label else "single_label_classification",
        )
    try:
        return CATConfig(**fields)
    except Exception as error:  # noqa: BLE001
        raise CheckpointConversionError(f"the checkpoint's architecture is inconsistent: {error}") from error


def _labels(checkpoint: dict, num_classes: int) -> dict[int, str]:
    """id2label from the task's label dictionary (name -> index), or LABEL_i where the checkpoint has none."""
    labels = (checkpoint.get("task_state") or {}).get("labels") or {}
    if not labels:
        return {i: f"LABEL_{i}" for i in range(num_classes)}
    try:
        id2label = {int(index): str(name) for name, index in labels.items()}
    except (TypeError, ValueError) as error:
        raise CheckpointConversionError(
            f"task_state labels must map names to class indices; found {list(labels.items())[:3]} ({error})."
        ) from None
    if sorted(id2label) != list(range(num_classes)):
        raise CheckpointConversionError(
            f"task_state labels cover indices {sorted(id2label)[:5]}... ({len(id2label)} labels), not classes "
            f"0..{num_classes - 1} of the head."
        )
    return id2label


def feature_extractor_from_checkpoint(
    checkpoint: dict, patch_size: int = 16, sampling_rate: int | None = None
) -> CATFeatureExtractor:
    """Statistics from the task's dataset flags (ESC-50 / Speech Commands / AudioSet), length from target_length,
    `padding="longest"` rounded to whole patches of the model; the fbank at `sampling_rate` (default 16 kHz, the
    rate of the recipe's downsr_16hz=true)."""
    task = checkpoint["cfg"].get("task") or {}
    model = checkpoint["cfg"].get("model") or {}
    # The dataset (which normalises) reads the task's flags; the model's copy only stands in where the task has none.
    flag = lambda name: bool(task[name] if name in task else model.get(name))  # noqa: E731
    preset = "speechcommands" if flag("spcv2_eval") else "esc50" if flag("esc50_eval") else "audioset"
    stats = FEATURE_PRESETS[preset]
    if sampling_rate not in (None, DEFAULT_SAMPLING_RATE) and task.get("downsr_16hz") is not False:
        logger.warning(
            f"sampling_rate={sampling_rate}, but this checkpoint's task resampled its audio to 16 kHz before the "
            "fbank (downsr_16hz is not false): its model expects 16 kHz fbanks. Convert without --sampling-rate "
            "unless you know better."
        )
    if task.get("downsr_16hz") is False and sampling_rate is None:
        logger.warning(
            "task.downsr_16hz=false: the original computed the fbank at the audio files' own sampling rate (32 kHz "
            "for the authors' AudioSet copy). The converted extractor works at 16 kHz, like downsr_16hz=true; pass "
            "the training files' rate (--sampling-rate 32000 on the command line) to convert for that recipe."
        )
    target_length = int(task.get("target_length") or model.get("target_length") or stats["max_length"])
    return CATFeatureExtractor(**{**stats, "max_length": target_length, "pad_to_multiple_of": patch_size,
                                  "sampling_rate": sampling_rate or DEFAULT_SAMPLING_RATE})


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def encoder_state_dict(state: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """Our CATModel state dict from an original one (keys under `prefix`); returns (converted, unused keys)."""
    converted, unused = {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            unused.append(key)
            continue
        name = key[len(prefix):]
        value = value.float() if value.is_floating_point() else value
        if name.startswith(_ENCODER) and (new := _rename(name[len(_ENCODER):], _EMBEDDING_RULES)):
            converted["embeddings." + new] = value
        elif m := _QKV.fullmatch(name):
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"layers.{m.group(1)}.attention.{part}.{m.group(2)}"] = chunk.clone()
        elif new := _rename(name, _BLOCK_RULES):
            converted[new] = value
        else:
            unused.append(key)
    return converted, unused


def _load_strict(model: torch.nn.Module, state: dict, what: str, prefix: str = "") -> None:
    """Load `state` (our names) into `model`, or fail naming the checkpoint's keys (`prefix` as in `_original_key`)."""
    expected = set(model.state_dict())
    missing = sorted(_original_key(k, prefix) for k in expected - set(state))
    unexpected = sorted(_original_key(k, prefix) for k in set(state) - expected)
    if missing or unexpected:
        raise CheckpointConversionError(
            f"{what}: the checkpoint does not fit the architecture inferred from its cfg and weight shapes. Missing "
            f"keys: {missing[:20]}{' ...' if len(missing) > 20 else ''}; unexpected keys: {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}."
        )
    for key, value in model.state_dict().items():
        if value.shape != state[key].shape:
            part = "each third of " if re.search(r"attention\.[qkv]_proj", key) else ""  # of the fused qkv
            raise CheckpointConversionError(
                f"{what}: {part}{_original_key(key, prefix)} has shape {tuple(state[key].shape)} in the checkpoint, but "
                f"the architecture inferred from its cfg and other weights needs {tuple(value.shape)}."
            )
    model.load_state_dict(state, strict=True)


def _reject_leftovers(unused: list[str], allowed: tuple[str, ...], what: str) -> None:
    leftovers = [k for k in unused if not any(re.fullmatch(p, k) for p in allowed)]
    if leftovers:
        raise CheckpointConversionError(f"{what}: unexpected keys in the checkpoint: {leftovers[:20]}"
                                        f"{' ...' if len(leftovers) > 20 else ''}.")


def _teacher_state(ema: dict, student: dict, stem_from_student: bool = False) -> dict:
    """The EMA teacher's CATModel state from `model["_ema"]`, given the student's converted state.

    With ema_encoder_only the original averages only the transformer blocks (saved as ``0.norm1.weight``, ...) and
    runs them on the student's embeddings. With ema_local_encoder=false (`stem_from_student`) the teacher's local
    encoder is set to None and it reads the student's stem output: the patch stem is then absent from `_ema`, while
    the convolutional stem's weights stay there unused (its local encoder is a method that None overrides). Embedding
    weights missing from `_ema` or unused are therefore the student's; missing block weights stay an error.
    """
    if all(re.match(r"\d+\.", key) for key in ema):
        ema = {f"blocks.{key}": value for key, value in ema.items()}
    teacher, unused = encoder_state_dict(ema)
    _reject_leftovers(unused, (), "EMA teacher")
    if stem_from_student:
        teacher = {k: v for k, v in teacher.items() if not k.startswith("embeddings.stem.")}
    from_student = sorted(k for k in student if k.startswith("embeddings.") and k not in teacher)
    if from_student:
        logger.warning(
            f"The original teacher ran on the student's {len(from_student)} embedding weights (e.g. "
            f"{from_student[0]}; ema_encoder_only or ema_local_encoder=false), so the converted teacher has copies "
            "of them. Continued pretraining with cat_hf averages the whole teacher, these parts included."
        )
    return {**{k: student[k] for k in from_student}, **teacher}


def build_model(checkpoint: dict, *, teacher: bool = False):
    """Our model with the checkpoint's weights: CATForPreTraining (pretraining), CATModel (pretraining, teacher=True)
    or CATForAudioClassification (finetuning)."""
    kind = _checkpoint_kind(checkpoint)
    state = dict(checkpoint["model"])
    ema = state.pop("_ema", None)
    config = config_from_checkpoint(checkpoint, kind, state)

    if kind == "finetuning":
        if teacher:
            raise CheckpointConversionError("--teacher needs a pretraining checkpoint; finetuning ones have no teacher.")
        encoder, unused = encoder_state_dict(state, prefix="model.")
        full = {f"cat.{k}": v for k, v in encoder.items()}
        for old, new in _HEADS.items():
            if old in state:
                full[new] = state[old].float()
        # clap_proj is kept by the original but unused for classification.
        _reject_leftovers(unused, (r"head\.(weight|bias)", r"fc_norm\.(weight|bias)", r"model\.clap_proj\.(weight|bias)"),
                          "finetuning checkpoint")
        model = CATForAudioClassification(config)
        _load_strict(model, full, "finetuning checkpoint", prefix="model.")
        return model.eval()

    if teacher and not ema:
        raise CheckpointConversionError("--teacher: this pretraining checkpoint has no EMA teacher (model['_ema']).")
    encoder, unused = encoder_state_dict(state)
    full = {f"cat.{k}": v for k, v in encoder.items()}
    leftovers = []
    for key in unused:
        name = key[len(_ENCODER):] if key.startswith(_ENCODER) else key
        if new := _rename(name, _DECODER_RULES):
            full[new] = state[key].float()
        elif key in ("clap_proj.weight", "clap_proj.bias"):
            if config.rr_embedding_dim is not None:
                full[key.replace("clap_proj", "rr_projector")] = state[key].float()
            elif key == "clap_proj.weight":
                logger.warning(
                    f"clap_proj of proj_type={checkpoint['cfg']['model'].get('proj_type')} is not cat_hf's RR head "
                    "(which maps the model's CLS onto the external embedding, proj_type 2/4/6): not converted."
                )
        else:
            leftovers.append(key)
    _reject_leftovers(leftovers, (), "pretraining checkpoint")
    if ema:
        ema_local_encoder = _image_cfg(_pretraining_model_cfg(checkpoint, kind)).get("ema_local_encoder")
        if ema_local_encoder is None:  # the original's default is false; a patch stem saved in `_ema` says true
            ema_local_encoder = any(key.endswith("local_encoder.proj.weight") for key in ema)
        stem_from_student = not ema_local_encoder
        full.update({f"teacher.{k}": v for k, v in _teacher_state(ema, encoder, stem_from_student).items()})
    else:
        full.update({f"teacher.{k[4:]}": v for k, v in list(full.items()) if k.startswith("cat.")})
    model = CATForPreTraining(config)
    _load_strict(model, full, "pretraining checkpoint")
    if teacher:  # exported only once the whole checkpoint has been checked, as without --teacher
        encoder_model = CATModel(config)
        encoder_model.load_state_dict(model.teacher.state_dict())
        return encoder_model.eval()
    return model.eval()


#: Model files of another model that would be loaded beside or instead of the converted ones.
_FOREIGN_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                    "*.ckpt", "*.h5", "*.msgpack", "adapter_config.json")


def _check_output_folder(checkpoint_path: Path, output_dir: Path, overwrite: bool, written: list[str]) -> None:
    """Refuse output folders where writing `written` (file names) would lose or mix up something."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is a file; pass a folder to write the model into.")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; choose another folder or pass overwrite=True "
                              "(--overwrite on the command line) to replace the converter's files there.")
    source, folder = checkpoint_path.resolve(), output_dir.resolve()
    if source.is_relative_to(folder):
        raise CheckpointConversionError(
            f"{output_dir} holds the checkpoint being converted ({checkpoint_path}); write the conversion to another "
            f"folder (e.g. {output_dir / 'hf'})."
        )
    foreign = sorted(p.name for pattern in _FOREIGN_WEIGHTS for p in output_dir.glob(pattern)
                     if p.is_file() and p.name not in written)
    if foreign:
        raise CheckpointConversionError(
            f"{output_dir} holds model files that the conversion would not replace: {foreign}; they would be loaded "
            "beside or instead of the converted weights. Move them away or choose another folder."
        )


def convert_checkpoint(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                       teacher: bool = False, overwrite: bool = False, sampling_rate: int | None = None) -> Path:
    """Convert an original checkpoint into `output_dir` (model weights as safetensors, config with auto_map,
    feature extractor, model source files). Nothing is written if anything fails.

    A new or empty `output_dir` appears whole (written under a temporary name and renamed). With `overwrite`, the
    files the converter writes replace those of the same names in a non-empty folder, one by one, and nothing else
    there is touched; a folder holding the checkpoint itself, or another model's weights, is refused.

    `sampling_rate`: the rate of the fbanks the model was trained on, for checkpoints of the downsr_16hz=false recipe
    (the audio files' own rate); default 16 kHz.
    """
    if sampling_rate is not None and sampling_rate <= 0:
        raise CheckpointConversionError(f"sampling_rate must be a positive number of Hz, got {sampling_rate}.")
    checkpoint_path, output_dir = Path(checkpoint_path), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        _check_output_folder(checkpoint_path, output_dir, overwrite, written=[])  # before the slow part
    checkpoint = load_original_checkpoint(checkpoint_path)
    model = build_model(checkpoint, teacher=teacher)
    damaged = damaged_tensors(model.state_dict().items())
    if damaged:
        raise CheckpointConversionError(
            f"{checkpoint_path} holds weights no trained model has ({'; '.join(damaged)}); the checkpoint is damaged "
            "or was saved from a diverged run. Nothing was written."
        )
    feature_extractor = feature_extractor_from_checkpoint(checkpoint, model.config.patch_size, sampling_rate)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        feature_extractor.save_pretrained(folder)

    resolved = output_dir.resolve()  # "." has no name to derive the staging folder's from
    resolved.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".tmp", dir=resolved.parent))
    try:
        write(staging)
        apply_default_modes(staging)
        if resolved.is_dir():  # existing folder: replace our files only, after checking what else is there
            _check_output_folder(checkpoint_path, output_dir, overwrite,
                                 written=[p.name for p in staging.iterdir()])
            for path in sorted(staging.iterdir()):
                os.replace(path, resolved / path.name)
        else:
            os.replace(staging, resolved)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the authors' fairseq checkpoint (.pt), pretraining or finetuning")
    parser.add_argument("output_dir", help="folder to write (must not exist or be empty unless --overwrite)")
    parser.add_argument("--teacher", action="store_true",
                        help="export the EMA teacher of a pretraining checkpoint instead of the student")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder, replacing only the files the converter writes")
    parser.add_argument("--sampling-rate", type=int, default=None, metavar="HZ",
                        help="rate of the fbanks the model was trained on: the training files' own rate for the "
                             "task.downsr_16hz=false recipe (32000 for the authors' AudioSet copy); default 16000")


def run_cli(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(args.checkpoint, args.output_dir, teacher=args.teacher, overwrite=args.overwrite,
                                 sampling_rate=args.sampling_rate)
    except (CheckpointConversionError, FileExistsError) as error:
        print(f"cat-hf convert: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
