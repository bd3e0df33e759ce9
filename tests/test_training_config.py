"""The training loops' one config system (`cat_hf.training_config`): YAML recipes, flags and `--set` overrides give
one name one type in both loops; the flags users and the README rely on keep working."""

from __future__ import annotations

import argparse

import pytest

from cat_hf.finetune import FinetuneConfig, FinetuneConfigError
from cat_hf.finetune import add_cli_arguments as finetune_arguments
from cat_hf.finetune import config_from_args as finetune_config
from cat_hf.pretrain import PretrainConfig
from cat_hf.pretrain import add_cli_arguments as pretrain_arguments
from cat_hf.pretrain import config_from_args as pretrain_config
from cat_hf.training_config import ConfigError, load_yaml

#: Every flag of the two commands before the shared config system (tests, README and scripts use them).
FINETUNE_FLAGS = (
    "--activation-checkpointing --adam-beta1 --adam-beta2 --adam-epsilon --audio-column --balanced-sampling "
    "--base-model --baseline --batch-size --check-audio --config --data --drop-path-rate --eval-batch-size "
    "--eval-steps --feature-preset --freq-mask-ratio --gain --gradient-accumulation-steps --label-column "
    "--label-smoothing --labels --layer-decay --layer-decay-stem --learning-rate --linear-probe --logging-steps "
    "--lora --lora-alpha --lora-dropout --lora-learning-rate --lora-modules-to-save --lora-plus-ratio --lora-r "
    "--lora-target-modules --loss --max-grad-norm --max-length --max-steps --merge --merge-adapter --metric "
    "--min-learning-rate --mixed-precision --mixup-alpha --mixup-prob --model --no-activation-checkpointing "
    "--no-balanced-sampling --no-baseline --no-gain --no-layer-decay-stem --no-linear-probe --no-lora --no-merge "
    "--no-noise --no-overwrite-output-dir --no-roll --noise --num-workers --output-dir --overwrite-output-dir "
    "--padding --preset --problem-type --report-to --roll --samples-per-epoch --seed --tags-separator --test-data "
    "--test-split --threads --time-mask-ratio --train-split --validation-data --validation-group-by "
    "--validation-size --validation-split --warmup-steps --weight-decay"
).split()
PRETRAIN_FLAGS = ("--allow-changed --batch-size --config --data --max-steps --output-dir --overwrite-output-dir "
                  "--resume --rr-encoder --set --stop-at-step --streaming --threads").split()


def _parser(add_arguments) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_earlier_flag_is_still_there_and_both_commands_take_resume_and_set():
    finetune_flags, pretrain_flags = _flags(_parser(finetune_arguments)), _flags(_parser(pretrain_arguments))
    assert set(FINETUNE_FLAGS) <= finetune_flags and set(PRETRAIN_FLAGS) <= pretrain_flags
    for shared in ("--set", "--resume", "--allow-changed", "--stop-at-step", "--output-dir", "--threads"):
        assert shared in finetune_flags and shared in pretrain_flags


def test_recipes_are_read_as_yaml_1_2_words_stay_words_and_5e_4_is_a_number(tmp_path):
    assert load_yaml("a: no\nb: off\nc: yes\nd: true\ne: 5e-4\nf: 5\ng: null\nh: 1.0e-3\ni: [0.9, 0.95]") == {
        "a": "no", "b": "off", "c": "yes", "d": True, "e": 5e-4, "f": 5, "g": None, "h": 1e-3, "i": [0.9, 0.95]}
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("mixed_precision: no\ncollapse_guard: off\nlearning_rate: 5e-4\nmodel:\n  preset: cat-tiny\n")
    config = PretrainConfig.from_yaml(recipe).with_overrides({"data": "somewhere"})
    assert (config.mixed_precision, config.collapse_guard, config.learning_rate) == ("no", "off", 5e-4)
    config.validate()  # PyYAML's YAML 1.1 read both words as False, which no setting accepts


def test_values_take_the_type_their_field_declares():
    config = FinetuneConfig.from_dict({"validation_size": "12", "labels": "dog, rain", "roll": "no",
                                       "learning_rate": "5e-4", "max_steps": 10.0, "layer_decay": 1})
    assert config.validation_size == 12 and isinstance(config.validation_size, int)
    assert config.labels == ["dog", "rain"] and config.roll is False
    assert config.learning_rate == 5e-4 and config.max_steps == 10 and config.layer_decay == 1.0
    assert FinetuneConfig.from_dict({"validation_size": 0.2}).validation_size == 0.2
    with pytest.raises(FinetuneConfigError, match="max_steps must be a whole number, got 'ten'"):
        FinetuneConfig.from_dict({"max_steps": "ten"})
    with pytest.raises(FinetuneConfigError, match="max_steps must be a whole number, got 2.5"):
        FinetuneConfig().with_overrides(["max_steps=2.5"])
    with pytest.raises(ConfigError, match="adam_betas must be a list of 2 values"):
        PretrainConfig.from_dict({"adam_betas": [0.9]})
    with pytest.raises(ConfigError, match="roll must be true or false"):
        FinetuneConfig.from_dict({"roll": "maybe"})
    with pytest.raises(ConfigError, match="must look like key=value"):
        FinetuneConfig().with_overrides(["learning_rate"])
    with pytest.raises(FinetuneConfigError, match=r"Unknown finetuning setting\(s\) \['model.x'\]"):
        FinetuneConfig().with_overrides(["model.x=1"])  # model is a path here, not a mapping
    tiny = PretrainConfig.from_yaml("tiny").with_overrides(["model.clone_batch=8", "rr_encoder=none"])
    assert tiny.model["clone_batch"] == 8 and tiny.model["preset"] == "cat-tiny"


def test_finetune_command_line_recipe_then_flags_then_set():
    args = _parser(finetune_arguments).parse_args([
        "--config", "tiny", "--data", "corpus", "--model", "enc", "--lora", "--no-baseline", "--labels", "a,b",
        "--validation-size", "30", "--learning-rate", "1e-3", "--set", "learning_rate=2e-3", "--set", "lora_r=4",
        "--set", "report_to=[tensorboard]", "--resume", "--allow-changed", "max_steps,seed", "--stop-at-step", "50",
    ])
    config = finetune_config(args)
    assert (config.data, config.model, config.lora, config.baseline, config.labels) == ("corpus", "enc", True, False,
                                                                                       ["a", "b"])
    assert config.validation_size == 30 and config.learning_rate == 2e-3 and config.lora_r == 4  # --set wins
    assert config.report_to == ["tensorboard"]
    assert config.max_length == FinetuneConfig.from_yaml("tiny").max_length  # the rest: the recipe's
    assert (config.resume, config.resume_allow_changed, config.stop_at_step) == ("latest", ["max_steps", "seed"], 50)
    assert finetune_config(_parser(finetune_arguments).parse_args(["--data", "x"])).preset == "cat-base"  # no recipe


def test_pretrain_command_line():
    args = _parser(pretrain_arguments).parse_args([
        "--config", "tiny", "--data", "corpus", "--max-steps", "30", "--streaming", "--resume", "auto",
        "--allow-changed", "batch_size", "--set", "model.clone_batch=4", "--set", "mixed_precision=no",
    ])
    config = pretrain_config(args)
    assert (config.data, config.max_steps, config.streaming, config.resume) == ("corpus", 30, True, "auto")
    assert config.resume_allow_changed == ["batch_size"] and config.model["clone_batch"] == 4
    recipe = PretrainConfig.from_yaml("tiny")
    assert (config.batch_size, config.output_dir) == (recipe.batch_size, recipe.output_dir)  # the rest: the recipe's
    with pytest.raises(SystemExit):
        _parser(pretrain_arguments).parse_args(["--config", "tiny", "--max-steps", "many"])


def test_a_requested_tracker_that_is_not_installed_is_named(caplog):
    import importlib.util

    from cat_hf.training import warn_missing_trackers

    missing = next(name for name in ("wandb", "comet_ml", "aim") if importlib.util.find_spec(name) is None)
    with caplog.at_level("WARNING", logger="cat_hf.training"):
        warn_missing_trackers([missing])
    assert missing in caplog.text and "metrics.jsonl" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cat_hf.training"):
        warn_missing_trackers("tensorboard")  # installed with the dev extra
        warn_missing_trackers(None)
    assert caplog.text == ""
