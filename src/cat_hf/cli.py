"""The `cat-hf` command line.

Each subcommand lives in the module that owns the feature; that module defines
`add_cli_arguments(parser)` and `run_cli(args) -> int`. Modules are imported only when their
subcommand runs, so `cat-hf --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("cat_hf.convert", "convert an original fairseq CAT checkpoint to a Hugging Face folder"),
    "embed": ("cat_hf.embed", "clip / frame embeddings of a corpus with a CAT model (--model), or cache an external "
                              "encoder's RR targets (--encoder)"),
    "pretrain": ("cat_hf.pretrain", "pretrain CAT (bootstrap EMA teacher + Representation Regularization)"),
    "finetune": ("cat_hf.finetune", "finetune CAT on labelled audio, fully or with LoRA"),
    "evaluate": ("cat_hf.evaluation", "evaluate a classifier: accuracy / mAP / mAUC / d-prime, per-class CSV"),
    "predict": ("cat_hf.inference", "classify audio files or folders (sliding windows for long clips)"),
    "push": ("cat_hf.hub", "push a model folder with a model card to the Hugging Face Hub"),
    "demo": ("cat_hf.demo", "end-to-end demo: synthesise a corpus, pretrain, LoRA-finetune, evaluate, classify"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (default: the process's arguments); only the requested subcommand's flags are built."""
    parser = argparse.ArgumentParser(prog="cat-hf", description="CAT, the Convolutional Audio Transformer, on the Hugging Face stack.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    requested = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Only the module of the requested subcommand is imported (argument definitions included).
        if name == requested:
            importlib.import_module(module_name).add_cli_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run_cli(args) or 0)
    except (ValueError, OSError) as error:  # bad input, named by the message: no traceback for the user
        print(f"cat-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where the command does not stop by itself (a second one during training)
        print(f"\ncat-hf {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
