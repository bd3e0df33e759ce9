"""cat-hf: CAT, the Convolutional Audio Transformer, on the Hugging Face stack.

Importing the package registers CAT with the transformers Auto classes, so that
`AutoModel.from_pretrained(folder)`, `AutoModelForAudioClassification`, `AutoFeatureExtractor` (also as `AutoProcessor`) and
`pipeline("audio-classification", model=folder)` work on CAT folders. Folders saved by this package also carry
the model's source files and an `auto_map`, so they load with `trust_remote_code=True` where cat_hf is not installed.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForAudioFrameClassification,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .configuration_cat import CAT_PRESETS, CATConfig
from .feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor
from .modeling_cat import (
    CATForAudioClassification,
    CATForAudioFrameClassification,
    CATForPreTraining,
    CATForPreTrainingOutput,
    CATFrameClassifierOutput,
    CATModel,
    CATModelOutput,
    CATPreTrainedModel,
    compute_inverse_block_mask,
)

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register("cat", CATConfig, exist_ok=True)
    AutoModel.register(CATConfig, CATModel, exist_ok=True)
    AutoModelForAudioClassification.register(CATConfig, CATForAudioClassification, exist_ok=True)
    AutoModelForAudioFrameClassification.register(CATConfig, CATForAudioFrameClassification, exist_ok=True)
    AutoModelForPreTraining.register(CATConfig, CATForPreTraining, exist_ok=True)
    AutoFeatureExtractor.register(CATConfig, CATFeatureExtractor, exist_ok=True)
    # CAT has no tokenizer, so its "processor" is the feature extractor (AutoProcessor would otherwise try the other
    # Auto classes in turn, and AutoImageProcessor asks whether to trust the folder's remote code).
    AutoProcessor.register(CATConfig, CATFeatureExtractor, exist_ok=True)
    # save_pretrained then writes auto_map + these source files, for trust_remote_code=True users.
    CATConfig.register_for_auto_class()
    CATModel.register_for_auto_class("AutoModel")
    CATForAudioClassification.register_for_auto_class("AutoModelForAudioClassification")
    CATForAudioFrameClassification.register_for_auto_class("AutoModelForAudioFrameClassification")
    CATForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    CATFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")


_register()

__all__ = [
    "CAT_PRESETS",
    "FEATURE_PRESETS",
    "CATConfig",
    "CATFeatureExtractor",
    "CATModel",
    "CATModelOutput",
    "CATForAudioClassification",
    "CATForAudioFrameClassification",
    "CATFrameClassifierOutput",
    "CATForPreTraining",
    "CATForPreTrainingOutput",
    "CATPreTrainedModel",
    "compute_inverse_block_mask",
]
