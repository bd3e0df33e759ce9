"""Finetune CAT on your own labelled audio (full finetuning, linear probe, or LoRA).

Same flags as `cat-hf finetune`; runs on one or many GPUs through Accelerate:

    accelerate launch examples/finetune.py --config esc50 --model path/to/pretrained-cat \
        --data esc50/fold1_train.csv --validation-data esc50/fold1_test.csv --output-dir cat-esc50-fold1

    python examples/finetune.py --config tiny --data my_audiofolder --model my-cat-tiny --lora --merge

`--config` takes a packaged recipe (tiny, as20k, as2m, esc50, spcv2) or a YAML file of `FinetuneConfig` fields;
flags override it. The exported folder works with `pipeline("audio-classification", model=OUTPUT_DIR)` (after
`import cat_hf`); for LoRA runs use `OUTPUT_DIR/merged` (written with `--merge`).
"""

import argparse
import sys

from cat_hf.finetune import add_cli_arguments, run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_arguments(parser)
    return run_cli(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
