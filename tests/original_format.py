"""Write models of ours back in the authors' fairseq checkpoint layout (test helper).

The reference fixture only covers the multi-resolution stem at depth 2 and width 192; this lets the tests build
original-layout checkpoints of other stems, widths and depths and check that conversion restores them exactly.
"""

from __future__ import annotations

import copy
import re

import torch

ENCODER = "modality_encoders.IMAGE."

_EMBEDDINGS = [
    (r"cls_token", "extra_tokens"),
    (r"position_embeddings", "fixed_positional_encoder.positions"),
    (r"context_norm\.(weight|bias)", r"context_encoder.norm.\1"),
    (r"stem\.proj\.(weight|bias)", r"local_encoder.proj.\1"),
    (r"stem\.downsamples\.(\d+)\.conv\.(weight|bias)", r"patch_embed.\1.proj.\2"),
    (r"stem\.downsamples\.(\d+)\.norm\.(weight|bias)", r"patch_embed.\1.norm.\2"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.norm1\.(weight|bias)", r"conv_blocks.\1.\2.norm1.\3"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.pw_in\.(weight|bias)", r"conv_blocks.\1.\2.conv1.\3"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.dw_conv\.(weight|bias)", r"conv_blocks.\1.\2.attn.\3"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.pw_out\.(weight|bias)", r"conv_blocks.\1.\2.conv2.\3"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.norm2\.(weight|bias)", r"conv_blocks.\1.\2.norm2.\3"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.mlp_in\.(weight|bias)", r"conv_blocks.\1.\2.mlp.fc1.\3"),
    (r"stem\.blocks\.(\d+)\.(\d+)\.mlp_out\.(weight|bias)", r"conv_blocks.\1.\2.mlp.fc2.\3"),
    (r"stem\.stage_projections\.(\d+)\.(weight|bias)", r"stage_output_decode.\1.\2"),
]
_LAYERS = [
    (r"layers\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]


def encoder_to_original(state: dict, num_stages: int) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("embeddings."):
            name = key[len("embeddings."):]
            if re.fullmatch(r"stem\.token_proj\.(weight|bias)", name):
                out[f"{ENCODER}patch_embed.{num_stages}.{name.split('.')[-1]}"] = value
                continue
            for pattern, replacement in _EMBEDDINGS:
                if re.fullmatch(pattern, name):
                    out[ENCODER + re.sub(pattern, replacement, name)] = value
                    break
            else:
                raise KeyError(key)
        elif m := re.fullmatch(r"layers\.(\d+)\.attention\.q_proj\.(weight|bias)", key):
            i, kind = m.groups()
            parts = [state[f"layers.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
        elif re.fullmatch(r"layers\.\d+\.attention\.[kv]_proj\.(weight|bias)", key):
            continue
        else:
            for pattern, replacement in _LAYERS:
                if re.fullmatch(pattern, key):
                    out[re.sub(pattern, replacement, key)] = value
                    break
            else:
                raise KeyError(key)
    return out


def model_cfg(config, *, add_conv: bool) -> dict:
    return {
        "_name": "data2vec_multi", "embed_dim": config.hidden_size, "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads, "mlp_ratio": config.mlp_ratio, "norm_eps": config.layer_norm_eps,
        "layer_norm_first": False, "loss_beta": 0.0, "add_conv": add_conv, "clone_batch": config.clone_batch,
        "average_top_k_layers": config.num_hidden_layers, "instance_norm_target_layer": True,
        "layer_norm_targets": True, "d2v_loss": 1.0, "cls_loss": 1.0, "clap_loss": 1.0, "clap_loss_type": "mse",
        "proj_type": 2, "add_bottleneck": False, "bottleneck_dim": 128,
        "ema_decay": 0.9998, "ema_end_decay": 0.99999, "ema_anneal_end_step": 100000,
        "modalities": {"image": {
            "num_extra_tokens": 1, "mask_prob": 0.8, "mask_length": 5, "mask_prob_adjust": 0.07,
            "mask_noise_std": 0.01, "patch_size": config.patch_size, "embed_dim": config.hidden_size, "conv_option": 0,
            "target_length": 1024, "max_length": config.max_time_patches, "ema_local_encoder": True,
            "decoder": {"decoder_dim": config.hidden_size, "decoder_groups": config.decoder_groups,
                        "decoder_kernel": 3, "decoder_layers": config.decoder_layers},
        }},
    }


def pretraining_checkpoint(model, *, fp16: bool = True) -> dict:
    """A CATForPreTraining in the layout of the authors' trainer: fp16 student + fp32 `_ema` teacher."""
    config = model.config
    stages = len(config.stem_strides)  # the token Linear follows the stages in `patch_embed`
    student = encoder_to_original(model.cat.state_dict(), stages)
    for i, conv in enumerate(model.decoder.convs):
        student[f"{ENCODER}decoder.blocks.{i}.0.weight"] = conv.weight.detach()
        student[f"{ENCODER}decoder.blocks.{i}.0.bias"] = conv.bias.detach()
    student[f"{ENCODER}decoder.proj.weight"] = model.decoder.proj.weight.detach()
    student[f"{ENCODER}decoder.proj.bias"] = model.decoder.proj.bias.detach()
    if model.rr_projector is not None:
        student["clap_proj.weight"] = model.rr_projector.weight.detach()
        student["clap_proj.bias"] = model.rr_projector.bias.detach()
    state = {k: (v.half() if fp16 else v).clone() for k, v in student.items()}
    state["_ema"] = {k: v.float().clone() for k, v in encoder_to_original(model.teacher.state_dict(), stages).items()}
    cfg = {"model": model_cfg(config, add_conv=config.stem_type == "multires"),
           "task": {"_name": "mae_image_pretraining", "target_length": 1024}}
    return {"args": None, "cfg": cfg, "model": state, "criterion": None, "optimizer_history": [],
            "task_state": {}, "extra_state": {}, "last_optimizer_state": None}


def finetuning_checkpoint(classifier, labels: list[str], *, esc50: bool = False, target_length: int = 512) -> dict:
    config = classifier.config
    stages = len(config.stem_strides)  # the token Linear follows the stages in `patch_embed`
    state = {"model." + k: v.half().clone() for k, v in encoder_to_original(classifier.cat.state_dict(), stages).items()}
    state["fc_norm.weight"] = classifier.fc_norm.weight.detach().half().clone()
    state["fc_norm.bias"] = classifier.fc_norm.bias.detach().half().clone()
    state["head.weight"] = classifier.classifier.weight.detach().half().clone()
    state["head.bias"] = classifier.classifier.bias.detach().half().clone()
    pretrain_cfg = {"model": model_cfg(config, add_conv=config.stem_type == "multires")}
    cfg = {"model": {"_name": "mae_image_classification", "num_classes": len(labels), "prediction_mode":
                     {"cls": "CLS_TOKEN", "mean": "MEAN_POOLING", "lin_softmax": "LIN_SOFTMAX"}[config.pooling],
                     "use_fc_norm": True,
                     "drop_path_rate": 0.1, "audio_mae": True, "esc50_eval": esc50, "target_length": target_length,
                     "linear_layer": 0,
                     "pretrained_model_args": copy.deepcopy(pretrain_cfg)},
           "task": {"_name": "mae_image_classification", "target_length": target_length, "esc50_eval": esc50}}
    return {"args": None, "cfg": cfg, "model": state, "task_state": {"labels": {n: str(i) for i, n in enumerate(labels)}}}
