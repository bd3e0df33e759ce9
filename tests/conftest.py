"""Shared fixtures: the authors' reference fixtures (../shared/reference) and small models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("CAT_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))

# The reference numbers were produced with 2 intra-op threads; CI machines have 2 cores.
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``): one intra-op
    thread is faster than two for them, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_file(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"reference fixture {path} is absent (set CAT_REFERENCE_DIR to the folder holding "
                    "expected.pt, cat_pretrain.pt and cat_finetune_as.pt)")
    return path


@pytest.fixture(scope="session")
def expected() -> dict[str, torch.Tensor]:
    """Tensors computed by the authors' code (see ../shared/reference/README.md)."""
    return torch.load(reference_file("expected.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def pretrain_checkpoint() -> Path:
    return reference_file("cat_pretrain.pt")


@pytest.fixture(scope="session")
def finetune_checkpoint() -> Path:
    return reference_file("cat_finetune_as.pt")


@pytest.fixture(scope="session")
def converted_pretrain(tmp_path_factory, pretrain_checkpoint) -> Path:
    """The reference pretraining checkpoint converted once, through the public function."""
    from cat_hf.convert import convert_checkpoint

    return convert_checkpoint(pretrain_checkpoint, tmp_path_factory.mktemp("converted") / "cat-pretrain")


@pytest.fixture(scope="session")
def converted_finetune(tmp_path_factory, finetune_checkpoint) -> Path:
    from cat_hf.convert import convert_checkpoint

    return convert_checkpoint(finetune_checkpoint, tmp_path_factory.mktemp("converted") / "cat-finetune")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """A random cat-tiny classifier (3 labels, single-label) with its feature extractor, saved once."""
    from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification

    torch.manual_seed(0)
    labels = ["dog", "rain", "siren"]
    config = CATConfig.from_preset(
        "cat-tiny", num_hidden_layers=2, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, problem_type="single_label_classification",
    )
    folder = tmp_path_factory.mktemp("tiny") / "cat-tiny-classifier"
    CATForAudioClassification(config).save_pretrained(folder)
    CATFeatureExtractor(max_length=256).save_pretrained(folder)
    return folder
