"""LoRA finetuning of CAT classifiers with PEFT: wrap, save the adapter alone, reload, merge.

Defaults (`LoraSettings`): rank 8, alpha 16, dropout 0.1 on the attention query and value projections
(`target_modules = ["q_proj", "v_proj"]`, the LoRA paper's choice); the classification head - `fc_norm` and
`classifier`, which are new for every label set - is trained in full through PEFT's `modules_to_save`. The LoRA
weights are 0.3 % of cat-base; with a 527-class AudioSet head 0.76 % of the parameters train (cat-tiny, 10 classes:
1.1 %). `modules_to_save` may also name nested modules by their last name parts, as PEFT matches them: adding
`norm1` and `norm2` tunes the LayerNorms of every block (transformer and stem) as well (+0.2 % of cat-tiny;
`--lora-modules-to-save` of `cat-hf finetune`). LoRA itself wraps only the transformer blocks' Linear layers: the
stem computes its projections functionally, so `add_lora` refuses stem targets instead of silently ignoring them.

PEFT has no audio-classification `TaskType`, so the model is wrapped as a plain `PeftModel` (no `task_type`): its
forward passes every argument through to `CATForAudioClassification.forward(input_values, attention_mask, labels,
**kwargs)`, which returns a loss when given `labels` and ignores extra keyword arguments - so the wrapped model
trains under transformers' `Trainer` as well as under the `cat_hf.finetune` loop.

An adapter folder (`save_lora_adapter`) holds:

- `adapter_model.safetensors`, `adapter_config.json` - PEFT's files; `base_model_name_or_path` is the pretrained
  CAT the adapter was trained on (absolute path for local folders),
- `classifier_config.json` - the `CATConfig` of the finetuned classifier (labels, `problem_type`), needed to rebuild
  the head before the adapter is loaded,
- `preprocessor_config.json` - the feature extractor.

`load_lora_model(adapter_dir)` rebuilds base + adapter; `merge_lora(adapter_dir, output_dir)` writes a plain
`CATForAudioClassification` folder (LoRA folded into the weights) that `pipeline("audio-classification")` serves.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging as hf_logging

from .configuration_cat import CATConfig
from .feature_extraction_cat import CATFeatureExtractor
from .files import write_folder_atomically
from .modeling_cat import CATForAudioClassification

if TYPE_CHECKING:  # peft is imported where it is used: `import cat_hf.lora` stays cheap for its constants
    from peft import LoraConfig, PeftModel

#: The attention projections LoRA adapts by default (query and value, as in the LoRA paper).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
#: Modules trained in full and saved with the adapter: the head is new for every label set.
DEFAULT_MODULES_TO_SAVE: tuple[str, ...] = ("fc_norm", "classifier")
#: File in an adapter folder with the finetuned classifier's config (labels, problem_type).
CLASSIFIER_CONFIG_NAME = "classifier_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Run records copied from an adapter folder into its merged folder.
RUN_RECORD_FILES = ("training_summary.json", "eval_results.json", "per_class_scores.csv", "predictions.csv",
                    "confusion_matrix.png")  # fmt: skip


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (see the module docstring for why these defaults)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    modules_to_save: Sequence[str] = field(default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; name at least one Linear layer, e.g. ['q_proj', 'v_proj'].")

    def to_peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            modules_to_save=list(self.modules_to_save),
            bias="none",
        )


# ----------------------------------------------------------------------------------------------------------------
# Wrapping


def add_lora(model: CATForAudioClassification, settings: LoraSettings | None = None, *, verbose: bool = True) -> PeftModel:
    """Wrap a classifier with LoRA adapters (in place) and print the trainable share of the parameters.

    The adapter remembers `model.name_or_path` as its base model: load `model` with `from_pretrained` from the
    pretrained folder it should later be rebuilt from.
    """
    settings = settings or LoraSettings()
    # The stem runs its projections as functional GEMMs on the weights (modeling_cat.pointwise), not through the
    # modules' forward, so a LoRA wrapper there would silently do nothing: only the blocks' Linear layers qualify.
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    adaptable = {name.rsplit(".", 1)[-1] for name in linears if ".embeddings." not in f".{name}"}
    missing = [name for name in settings.target_modules if name not in adaptable]
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} are not Linear layers of {type(model).__name__}'s transformer blocks; "
            f"choose from {sorted(adaptable)} (attention: q_proj, k_proj, v_proj, o_proj; MLP: fc1, fc2). The stem's "
            "projections (token_proj, the CBlock convolutions) run as functional GEMMs that LoRA cannot wrap: to "
            "adapt the stem, add its modules to modules_to_save (trained in full) instead."
        )
    module_names = [name for name, _ in model.named_modules() if name]
    unknown = [target for target in settings.modules_to_save
               if not any(name == target or name.endswith("." + target) for name in module_names)]  # fmt: skip
    if unknown:
        raise ValueError(
            f"modules_to_save {unknown} name no module of the classifier; PEFT matches a name or its last parts, e.g. "
            "fc_norm, classifier, norm1, norm2 (the post-attention / post-MLP LayerNorms of every block)."
        )
    name_or_path = getattr(model, "name_or_path", "") or ""
    if name_or_path and Path(name_or_path).is_dir():
        model.name_or_path = os.path.abspath(name_or_path)  # the adapter must find its base from anywhere
    from peft import get_peft_model

    peft_model = get_peft_model(model, settings.to_peft_config())
    if verbose:
        print(describe_trainable(peft_model, "LoRA"))
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters. For a PEFT model, "all" counts the base model plus the adapters (each
    `modules_to_save` copy once, so the head is not counted twice)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        trainable, _ = model.get_nb_trainable_parameters()
        base = model.get_base_model()
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        return trainable, sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n and
                              ".modules_to_save." not in n) + adapters  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def describe_trainable(model: torch.nn.Module, what: str = "model") -> str:
    trainable, total = count_parameters(model)
    return f"{what}: trainable params: {trainable:,} || all params: {total:,} || trainable%: {100.0 * trainable / total:.4f}"


# ----------------------------------------------------------------------------------------------------------------
# Saving, loading, merging


def _base_reference(peft_model: PeftModel) -> str | None:
    config = peft_model.peft_config[peft_model.active_adapter]
    return config.base_model_name_or_path


def save_lora_adapter(
    peft_model: PeftModel, output_dir: str | os.PathLike, feature_extractor: CATFeatureExtractor | None = None
) -> Path:
    """Write the adapter alone (LoRA weights + the fully trained head), the classifier config, the feature
    extractor and the base-model reference to `output_dir` (see the module docstring)."""
    base = _base_reference(peft_model)
    if not base:
        raise ValueError(
            "The LoRA model does not know its base model (name_or_path is empty): load the classifier with "
            "CATForAudioClassification.from_pretrained(PRETRAINED_FOLDER, ...) before add_lora, so the adapter can be "
            "rebuilt on it later."
        )
    classifier_config = peft_model.get_base_model().config

    def write(folder: Path) -> None:
        peft_model.save_pretrained(folder)
        classifier_config.to_json_file(folder / CLASSIFIER_CONFIG_NAME)
        if feature_extractor is not None:
            feature_extractor.save_pretrained(folder)

    return write_folder_atomically(output_dir, write)


def _read_adapter_folder(adapter_dir: Path) -> tuple[dict[str, Any], CATConfig]:
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CLASSIFIER_CONFIG_NAME):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(
                f"'{adapter_dir}' is not a cat-hf LoRA adapter folder: {name} is missing. Point to the output folder of "
                "`cat-hf finetune --lora` (or a folder written by cat_hf.lora.save_lora_adapter)."
            )
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    return adapter_config, CATConfig.from_json_file(str(adapter_dir / CLASSIFIER_CONFIG_NAME))


def load_lora_model(
    adapter_dir: str | os.PathLike, base_model: str | os.PathLike | None = None, *, is_trainable: bool = False
) -> PeftModel:
    """Rebuild base model + adapter: the classifier is created with the saved `classifier_config.json` on the base
    weights (`base_model`, default: the adapter's `base_model_name_or_path`), then `PeftModel.from_pretrained` loads
    the LoRA weights and the trained head."""
    adapter_dir = Path(adapter_dir)
    adapter_config, classifier_config = _read_adapter_folder(adapter_dir)
    base = os.fspath(base_model) if base_model is not None else adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The adapter in '{adapter_dir}' names no base model; pass base_model=PRETRAINED_FOLDER.")
    if not os.path.exists(base) and (base.startswith((".", "/", "~")) or os.path.isabs(base)):
        raise FileNotFoundError(
            f"The adapter's base model '{base}' does not exist; pass base_model= (or --base-model) with the pretrained "
            "CAT folder the adapter was trained on."
        )
    # The base has no (or another) head: transformers' load report would call fc_norm / classifier "newly
    # initialized", but the adapter's modules_to_save replace them right below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = CATForAudioClassification.from_pretrained(base, config=classifier_config, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)


def merge_lora(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, base_model: str | os.PathLike | None = None
) -> Path:
    """Fold the adapter into the base weights and save a plain `CATForAudioClassification` folder (config with the
    labels and problem_type, weights, feature extractor, plus the run records found next to the adapter)."""
    adapter_dir = Path(adapter_dir)
    merged = load_lora_model(adapter_dir, base_model).merge_and_unload()
    merged.eval()
    feature_extractor = (
        CATFeatureExtractor.from_pretrained(adapter_dir) if (adapter_dir / "preprocessor_config.json").is_file() else None
    )

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        if feature_extractor is not None:
            feature_extractor.save_pretrained(folder)
        for name in RUN_RECORD_FILES:
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, folder / name)

    return write_folder_atomically(output_dir, write)


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CLASSIFIER_CONFIG_NAME",
    "DEFAULT_MODULES_TO_SAVE",
    "DEFAULT_TARGET_MODULES",
    "LoraSettings",
    "add_lora",
    "count_parameters",
    "describe_trainable",
    "load_lora_model",
    "merge_lora",
    "save_lora_adapter",
]
