"""Publishing to the Hub: model cards and `push_folder`, against a real HTTP server on 127.0.0.1.

The server (tests/hub_server.py) speaks the Hub API that the installed huggingface_hub / transformers / peft
clients use, so uploads and downloads run the clients' real code paths; only the remote end is local.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer  # noqa: E402

from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATModel  # noqa: E402
from cat_hf.hub import (  # noqa: E402
    CARD_KINDS,
    HubPushError,
    _format_params,
    ModelFolderError,
    infer_card_kind,
    load_card_template,
    push_folder,
    render_model_card,
)

LABELS = ["dog", "rain", "sea_waves"]
TINY = dict(num_hidden_layers=1)  # cat-tiny with one block: a few MB, fast on CPU
# Prepended to scripts that play a Hub user without cat-hf: any import of cat_hf fails.
BLOCK_CAT_HF = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockCatHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "cat_hf" or name.startswith("cat_hf."):
                raise ImportError("cat_hf is blocked: this script plays a user without cat-hf")
    sys.meta_path.insert(0, _BlockCatHf())
    """
)

# What cat_hf.evaluation writes (its eval_results.json document, trimmed to the fields the card reads + extras).
EVAL_DOCUMENT = {
    "task": "audio-classification",
    "problem_type": "single_label_classification",
    "model": "cat-tiny-clf",
    "dataset": "toy-sounds",
    "split": "test",
    "metrics": {"accuracy": 0.625, "top_2_accuracy": 0.875, "macro_f1": 0.5981},
    "num_examples": 24,
    "num_skipped": 0,
    "files": {"eval_results": "eval_results.json"},
}
TRAINING_SUMMARY = {
    "mode": "full",
    "dataset": "toy-sounds",
    "steps": 40,
    "batch_size": 8,
    "learning_rate": 5e-5,
    "wall_time_s": 93.4,
    "hardware": "2 CPU cores",
    "label_smoothing": 0.1,
}


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`: proves a push left the local folder untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _input(seed: int = 0, frames: int = 128) -> torch.Tensor:
    return torch.randn(1, frames, 128, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server, server.activate():
        yield server


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cat-clf")
    torch.manual_seed(0)
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})
    config = CATConfig.from_preset("cat-tiny", **TINY, num_labels=3, **labels)
    CATForAudioClassification(config).eval().save_pretrained(folder)
    CATFeatureExtractor.from_preset("speechcommands").save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(EVAL_DOCUMENT))
    (folder / "training_summary.json").write_text(json.dumps(TRAINING_SUMMARY))
    return folder


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cat-enc")
    torch.manual_seed(1)
    CATModel(CATConfig.from_preset("cat-tiny", **TINY)).save_pretrained(folder)
    CATFeatureExtractor.from_preset("speechcommands").save_pretrained(folder)
    return folder


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        if p.is_file():
            (dest / p.name).write_bytes(p.read_bytes())
    return dest


# ------------------------------------------------------------------------------------------------ model cards


def test_templates_ship_in_the_package():
    import importlib.resources

    package = importlib.resources.files("cat_hf.model_cards")
    repo_dir = Path(__file__).resolve().parents[1] / "model_cards"
    for kind in CARD_KINDS:
        packaged = package.joinpath(f"{kind}.md").read_text(encoding="utf-8")
        assert packaged == (repo_dir / f"{kind}.md").read_text(encoding="utf-8")
        assert load_card_template(kind) == packaged
    with pytest.raises(ValueError, match="choose one of"):
        load_card_template("merged")


def test_card_kind_is_inferred_from_the_folder(classifier_folder, pretrained_folder, tmp_path):
    assert infer_card_kind(classifier_folder) == "finetuned"
    assert infer_card_kind(pretrained_folder) == "pretrained"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert infer_card_kind(tmp_path) == "lora"
    # transformers' placeholder labels are not real classes: an encoder with LABEL_0/LABEL_1 is pretrained
    other = tmp_path / "plain"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "cat", "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    assert infer_card_kind(other) == "pretrained"


def test_finetuned_card_metadata_parses_with_huggingface_hub(classifier_folder):
    from huggingface_hub import ModelCard

    text = render_model_card(classifier_folder, repo_id="test-user/cat-tiny-clf", datasets=["test-org/toy-sounds"])
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "audio-classification"
    assert {"audio", "cat", "audio-classification"} <= set(data.tags)
    assert data.datasets == ["test-org/toy-sounds"]
    # model-index holds exactly the measured numbers of eval_results.json
    measured = {r.metric_name: r.metric_value for r in data.eval_results}
    assert measured == pytest.approx(EVAL_DOCUMENT["metrics"])
    assert {r.dataset_name for r in data.eval_results} == {"toy-sounds"}
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert {r.task_type for r in data.eval_results} == {"audio-classification"}
    assert data.model_name == "cat-tiny-clf"
    body = card.text
    for section in ("## Intended use", "## Training", "## Evaluation", "## How to use", "## Limitations"):
        assert section in body
    assert "`dog`, `rain`, `sea_waves`" in body
    assert "| Batch size | 8 |" in body and "| Peak learning rate | 5e-05 |" in body
    assert "| Wall time | 93.4 s |" in body and "| Hardware | 2 CPU cores |" in body
    assert "| label smoothing | 0.1 |" in body  # extra recorded facts are kept
    assert 'pipeline("audio-classification", model="test-user/cat-tiny-clf")' in body
    assert "import cat_hf" in body
    assert "128 frames" in body  # the feature extractor's window, read from preprocessor_config.json


def test_pretrained_card_has_no_model_index_without_measurements(pretrained_folder):
    from huggingface_hub import ModelCard

    text = render_model_card(pretrained_folder, repo_id="test-user/cat-tiny-encoder")
    assert "model-index" not in text
    card = ModelCard(text, ignore_metadata_errors=False)
    assert card.data.pipeline_tag == "feature-extraction"
    assert card.data.library_name == "transformers"
    assert card.data.eval_results is None
    assert "No evaluation was recorded" in card.text
    assert "No training record was found" in card.text
    assert 'AutoModel.from_pretrained("test-user/cat-tiny-encoder")' in card.text
    # learned parameters only: the saved sin-cos position table is a buffer
    learned = sum(p.numel() for p in CATModel.from_pretrained(pretrained_folder).parameters())
    assert f"**Parameters:** {_format_params(learned)} (" in card.text


def test_card_reads_nested_run_config_and_hides_local_paths(pretrained_folder, tmp_path):
    folder = _copy(pretrained_folder, tmp_path / "enc")
    summary = {  # the shape of cat-hf's pretrain/finetune summaries: facts on top, the run config nested
        "format": "cat-hf-finetune/1",
        "mode": "self-supervised pretraining (EMA teacher + Representation Regularization)",
        "dataset": "/home/someone/private/corpora/sonic-pi",
        "steps": 1200,
        "train_runtime_s": 7260.0,
        "rr_encoder": "aisfx",
        "config": {"batch_size": 12, "learning_rate": 5e-4, "mixed_precision": "no", "seed": 3},
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    text = render_model_card(folder, repo_id="test-user/enc")
    assert "/home/someone" not in text and "`sonic-pi (local path)`" in text
    assert "| Batch size | 12 |" in text and "| Peak learning rate | 0.0005 |" in text
    assert "| Precision | fp32 |" in text and "| Wall time | 2 h 01 min |" in text
    assert "| rr encoder | aisfx |" in text and "cat-hf-finetune/1" not in text
    assert "datasets:" not in text  # a local corpus is not a Hub dataset id


def test_card_overrides_are_checked(pretrained_folder):
    text = render_model_card(pretrained_folder, "pretrained", repo_id="a/b", title="My encoder", license="mit",
                             tags=["speech"])
    assert "# My encoder" in text and "license: mit" in text and "- speech" in text
    with pytest.raises(ValueError, match="unknown model card override"):
        render_model_card(pretrained_folder, repo_id="a/b", colour="blue")


# ------------------------------------------------------------------------------------------------ pushing


def test_push_then_load_with_auto_classes_and_pipeline(hub, classifier_folder):
    from transformers import AutoModel, AutoModelForAudioClassification, pipeline

    before = _snapshot(classifier_folder)
    result = push_folder(classifier_folder, "test-user/cat-tiny-clf")
    assert _snapshot(classifier_folder) == before  # no README.md or anything else written locally
    assert result.card_kind == "finetuned" and result.card_source == "generated"
    remote = hub.repo_files("test-user/cat-tiny-clf")
    assert result.commit_oid == hub.branches("test-user/cat-tiny-clf")["main"]
    assert hub.commit_count("test-user/cat-tiny-clf") == 2  # the repo's initial commit + ONE upload commit
    for name in before:
        assert remote[name] == (classifier_folder / name).read_bytes()
    assert remote["README.md"].decode() == result.card
    assert not hub.is_private("test-user/cat-tiny-clf")

    local = CATForAudioClassification.from_pretrained(classifier_folder).eval()
    loaded = AutoModelForAudioClassification.from_pretrained("test-user/cat-tiny-clf").eval()
    assert isinstance(loaded, CATForAudioClassification)
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_values=x).logits, local(input_values=x).logits, rtol=0, atol=0)
    assert isinstance(AutoModel.from_pretrained("test-user/cat-tiny-clf"), CATModel)

    classifier = pipeline("audio-classification", model="test-user/cat-tiny-clf")
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    predictions = classifier(audio)
    assert sorted(p["label"] for p in predictions) == sorted(LABELS)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    features = CATFeatureExtractor.from_pretrained(classifier_folder)(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = local(**features).logits.softmax(-1)[0]
    assert predictions[0]["label"] == LABELS[int(expected.argmax())]
    assert predictions[0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_private_repo_needs_the_owners_token(hub, pretrained_folder):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoModel

    result = push_folder(pretrained_folder, "test-user/cat-private", private=True)
    assert hub.is_private("test-user/cat-private")
    assert result.card_kind == "pretrained"
    assert HfApi().whoami()["name"] == "test-user"
    assert HfApi().model_info("test-user/cat-private").private is True  # HF_TOKEN of the owner
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("test-user/cat-private")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.other_token).model_info("test-user/cat-private")
    with pytest.raises(OSError):
        AutoModel.from_pretrained("test-user/cat-private", token=False)
    model = AutoModel.from_pretrained("test-user/cat-private")
    assert isinstance(model, CATModel)


def test_push_to_a_branch(hub, classifier_folder, tmp_path):
    from transformers import AutoModelForAudioClassification

    repo = "test-user/cat-branches"
    first = push_folder(classifier_folder, repo, revision="experiment", commit_message="try a branch")
    assert first.branch_created and first.revision == "experiment"
    branches = hub.branches(repo)
    assert set(branches) == {"main", "experiment"} and branches["experiment"] == first.commit_oid
    assert set(hub.repo_files(repo, "main")) == {".gitattributes"}  # main untouched
    assert "model.safetensors" in hub.repo_files(repo, "experiment")
    assert hub.requests_for("commit")[-1].path.endswith("/commit/experiment")

    model = AutoModelForAudioClassification.from_pretrained(repo, revision="experiment")
    assert model.config.id2label[2] == "sea_waves"
    with pytest.raises((OSError, ValueError)):
        AutoModelForAudioClassification.from_pretrained(repo)  # nothing to load on main

    # unchanged files: the client skips the empty commit
    same = push_folder(classifier_folder, repo, revision="experiment", commit_message="again")
    assert not same.branch_created and same.commit_oid == first.commit_oid and not same.changed
    assert first.changed
    changed = _copy(classifier_folder, tmp_path / "changed")
    (changed / "eval_results.json").write_text(json.dumps({**EVAL_DOCUMENT, "metrics": {"accuracy": 0.75}}))
    second = push_folder(changed, repo, revision="experiment", commit_message="new evaluation")
    assert second.commit_oid != first.commit_oid and hub.branches(repo)["experiment"] == second.commit_oid
    card = hub.repo_files(repo, "experiment")["README.md"].decode()
    assert "| toy-sounds (test), 24 clips | accuracy | 0.75 |" in card

    with pytest.raises(HubPushError, match="HTTP 404") as info:
        push_folder(classifier_folder, repo, revision="no-such-branch", create_branch=False)
    assert info.value.status_code == 404 and "no-such-branch" not in hub.branches(repo)


def test_a_new_branch_of_the_same_files_is_not_reported_as_a_push(hub, classifier_folder, capsys):
    from cat_hf import cli

    repo = "test-user/cat-same-files"
    first = push_folder(classifier_folder, repo)
    copy = push_folder(classifier_folder, repo, revision="copy")
    assert copy.branch_created and not copy.changed and copy.commit_oid == first.commit_oid
    assert cli.main(["push", str(classifier_folder), repo, "--revision", "copy-2"]) == 0
    assert "Nothing to push: new branch test-user/cat-same-files @ copy-2" in capsys.readouterr().out


def test_repo_id_without_namespace_goes_to_the_token_user(hub, pretrained_folder):
    result = push_folder(pretrained_folder, "cat-short-name")
    assert result.repo_id == "test-user/cat-short-name"
    assert 'AutoModel.from_pretrained("test-user/cat-short-name")' in result.card
    assert hub.repo_files("test-user/cat-short-name")["README.md"].decode() == result.card


def test_dry_run_uploads_nothing(hub, classifier_folder, capsys):
    n_requests = len(hub.requests)
    result = push_folder(classifier_folder, "test-user/cat-dry", dry_run=True)
    assert len(hub.requests) == n_requests  # not a single request reached the Hub
    assert hub.get_repo("test-user/cat-dry") is None
    assert result.dry_run and result.commit_oid is None
    out = capsys.readouterr().out
    size = (classifier_folder / "model.safetensors").stat().st_size
    assert "model.safetensors" in out and f"{size / 1e6:.1f} MB" in out
    assert "README.md" in out and "[model card, generated]" in out
    assert "pipeline_tag: audio-classification" in out  # the head of the rendered card
    assert "nothing was uploaded" in out
    assert [path for path, _ in result.files] == sorted(["README.md", *_snapshot(classifier_folder)])


def test_training_state_and_logs_are_not_uploaded(hub, pretrained_folder, tmp_path):
    """What cat-hf pretrain / finetune leave next to the model (resume checkpoints with optimizer state and pickled
    RNG states, TensorBoard logs) stays local; the model and its pretraining export go up."""
    folder = _copy(pretrained_folder, tmp_path / "run")
    leftovers = ["checkpoints/step-0000050/optimizer.bin", "checkpoints/step-0000050/random_states_0.pkl",
                 "checkpoints/step-0000050/model.safetensors", "tensorboard/events.out.tfevents.1",
                 "logs/events.out.tfevents.2", "scheduler.bin", "random_states_1.pkl"]
    for name in [*leftovers, "pretraining/model.safetensors"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    uploaded = [path for path, _ in push_folder(folder, "test-user/cat-leftovers", dry_run=True).files]
    assert "pretraining/model.safetensors" in uploaded and "model.safetensors" in uploaded
    assert not set(leftovers) & set(uploaded)


def test_failed_upload_says_what_failed_and_leaves_the_folder_intact(hub, classifier_folder):
    repo = "test-user/cat-fails"
    before = _snapshot(classifier_folder)
    hub.fail("commit", status=500, message="disk full on the storage node")
    with pytest.raises(HubPushError) as info:
        push_folder(classifier_folder, repo)
    message = str(info.value)
    assert "commit" in info.value.step and info.value.status_code == 500
    assert "HTTP 500" in message and "disk full on the storage node" in message and "/commit/main" in message
    assert _snapshot(classifier_folder) == before
    assert hub.commit_count(repo) == 1  # repo created, nothing committed

    hub.fail("create_repo", status=403, message="quota exceeded")
    with pytest.raises(HubPushError, match="create repository.*HTTP 403.*quota exceeded"):
        push_folder(classifier_folder, "test-user/cat-fails-2")

    hub.fail_next_commit = True
    with pytest.raises(HubPushError, match="HTTP 500"):
        push_folder(classifier_folder, repo)
    assert hub.commit_count(repo) == 1 and not hub.fail_next_commit

    result = push_folder(classifier_folder, repo)  # the same push works once the Hub recovers
    assert hub.branches(repo)["main"] == result.commit_oid
    assert _snapshot(classifier_folder) == before


def test_auth_failures_are_explained(hub, pretrained_folder):
    with pytest.raises(HubPushError, match="HTTP 403.*write") as info:
        push_folder(pretrained_folder, "test-user/cat-readonly", token=hub.read_token)
    assert info.value.step == "create repository"
    with pytest.raises(HubPushError, match="HTTP 401.*token"):
        push_folder(pretrained_folder, "test-user/cat-badtoken", token="hf_not_a_real_token")
    assert hub.get_repo("test-user/cat-readonly") is None


def test_user_readme_is_kept_unless_asked(hub, classifier_folder, tmp_path):
    folder = _copy(classifier_folder, tmp_path / "with-readme")
    user_card = "---\nlicense: mit\n---\n# My own card\n\nHand-written.\n"
    (folder / "README.md").write_text(user_card)
    result = push_folder(folder, "test-user/cat-user-card")
    assert result.card_source == "user"
    assert hub.repo_files("test-user/cat-user-card")["README.md"].decode() == user_card

    result = push_folder(folder, "test-user/cat-user-card", overwrite_card=True)
    assert result.card_source == "regenerated"
    assert "## How to use" in hub.repo_files("test-user/cat-user-card")["README.md"].decode()
    assert (folder / "README.md").read_text() == user_card  # only the upload changed


def test_unloadable_folders_are_refused_before_any_request(hub, classifier_folder, tmp_path):
    n_requests = len(hub.requests)
    with pytest.raises(ModelFolderError, match="config.json"):
        push_folder(tmp_path, "test-user/cat-empty")
    broken = _copy(classifier_folder, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match="truncated"):
        push_folder(broken, "test-user/cat-truncated")
    no_weights = _copy(classifier_folder, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="safetensors"):
        push_folder(no_weights, "test-user/cat-no-weights")
    with pytest.raises(ValueError, match="invalid repo id"):
        push_folder(classifier_folder, "test-user/bad name!")
    assert len(hub.requests) == n_requests


def test_lora_adapter_card_and_peft_load(hub, classifier_folder, tmp_path):
    from huggingface_hub import ModelCard
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForAudioClassification

    push_folder(classifier_folder, "test-user/cat-lora-base")
    base = AutoModelForAudioClassification.from_pretrained("test-user/cat-lora-base")
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(3))
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)  # PEFT writes a boilerplate README.md: replaced by our card
    assert "Model Card for Model ID" in (adapter_dir / "README.md").read_text()

    result = push_folder(adapter_dir, "test-user/cat-lora")
    assert result.card_kind == "lora" and result.card_source == "regenerated"
    card = ModelCard(hub.repo_files("test-user/cat-lora")["README.md"].decode(), ignore_metadata_errors=False)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "test-user/cat-lora-base"
    assert "lora" in card.data.tags and card.data.eval_results is None
    assert 'PeftModel.from_pretrained(AutoModelForAudioClassification.from_pretrained("test-user/cat-lora-base")' \
        in card.text

    fresh_base = AutoModelForAudioClassification.from_pretrained("test-user/cat-lora-base").eval()
    x = _input(seed=5)
    with torch.no_grad():
        base_logits = fresh_base(input_values=x).logits
        reloaded = PeftModel.from_pretrained(fresh_base, "test-user/cat-lora").eval()
        torch.testing.assert_close(reloaded(input_values=x).logits, adapted.eval()(input_values=x).logits)
        assert not torch.allclose(reloaded(input_values=x).logits, base_logits, atol=1e-4)  # the adapter acts


def test_cat_lora_adapter_card_code_runs_as_written(hub, pretrained_folder, tmp_path):
    """A cat-hf adapter (with classifier_config.json: labels and head size) on a base encoder from the Hub: the
    card's "How to use" code, executed as written, rebuilds the finetuned classifier."""
    import re

    from cat_hf.lora import add_lora, save_lora_adapter

    push_folder(pretrained_folder, "test-user/cat-encoder-base")
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})
    torch.manual_seed(2)
    classifier = CATForAudioClassification.from_pretrained("test-user/cat-encoder-base", num_labels=3, **labels)
    adapted = add_lora(classifier, verbose=False)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(4))
    adapter_dir = save_lora_adapter(adapted, tmp_path / "adapter", CATFeatureExtractor())
    push_folder(adapter_dir, "test-user/cat-encoder-lora")

    card = hub.repo_files("test-user/cat-encoder-lora")["README.md"].decode()
    assert "`dog`, `rain`, `sea_waves`" in card  # labels read from classifier_config.json
    with_package, without_package = re.findall(r"```python\n(.*?)```", card.split("## How to use")[1], re.S)[:2]
    namespace: dict = {}
    exec(with_package, namespace)  # noqa: S102 - the card's own snippet, against the local test Hub
    x = _input(seed=6)
    with torch.no_grad():
        expected = adapted.eval()(input_values=x).logits
        torch.testing.assert_close(namespace["model"].eval()(input_values=x).logits, expected)

    # The second snippet, for Hub users without cat-hf: a fresh Python in which cat_hf cannot be imported.
    assert "import cat_hf" not in without_package and "trust_remote_code=True" in without_package
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = BLOCK_CAT_HF + without_package + textwrap.dedent(
        f"""
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        assert "cat_hf" not in type(model.base_model.model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(input_values=io["x"]).logits, io["expected"])
        print("same logits")
        """
    )
    env = {**os.environ, **hub.client_env(), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same logits" in done.stdout


def test_cli_push(hub, classifier_folder, capsys, monkeypatch):
    from cat_hf import cli

    monkeypatch.setattr(sys, "argv", ["cat-hf"])
    assert cli.main(["push", str(classifier_folder), "test-user/cat-cli", "--dry-run"]) == 0
    assert "nothing was uploaded" in capsys.readouterr().out
    assert hub.get_repo("test-user/cat-cli") is None

    code = cli.main(["push", str(classifier_folder), "test-user/cat-cli", "--private", "--revision", "v1",
                     "--commit-message", "first release", "--card-kind", "finetuned"])
    assert code == 0
    assert "Pushed" in capsys.readouterr().out
    assert hub.is_private("test-user/cat-cli") and "v1" in hub.branches("test-user/cat-cli")
    repo = hub.get_repo("test-user/cat-cli")
    assert repo.commits[repo.branches["v1"]].title == "first release"

    assert cli.main(["push", str(classifier_folder.parent), "test-user/cat-cli"]) == 2  # not a model folder
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_plain_hf_endpoint_in_a_fresh_process(hub, classifier_folder):
    """What a user does: HF_ENDPOINT/HF_TOKEN in the environment, then transformers, with or without cat_hf."""
    push_folder(classifier_folder, "test-user/cat-env", private=True)
    code = textwrap.dedent(
        """
        import json, numpy as np
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification
        remote = AutoModelForAudioClassification.from_pretrained("test-user/cat-env", trust_remote_code=True)
        extractor = AutoFeatureExtractor.from_pretrained("test-user/cat-env", trust_remote_code=True)
        import sys
        remote_code = "cat_hf" not in sys.modules  # loaded from the repo's own model files
        import cat_hf
        from transformers import pipeline
        audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
        top = pipeline("audio-classification", model="test-user/cat-env")(audio)[0]
        logits = remote(**extractor(audio, sampling_rate=16000, return_tensors="pt")).logits[0]
        print(json.dumps({"remote_code": remote_code, "top": top["label"], "score": top["score"],
                          "remote_top": remote.config.id2label[int(logits.argmax())],
                          "remote_score": float(logits.softmax(-1).max())}))
        """
    )
    env = {**os.environ, **hub.client_env()}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(classifier_folder.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["remote_code"] is True
    assert out["top"] == out["remote_top"] and out["score"] == pytest.approx(out["remote_score"], abs=1e-5)
    assert hub.requests_for("resolve")  # the downloads went to the local server
