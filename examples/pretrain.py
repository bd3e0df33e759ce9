"""Pretrain CAT on your own audio with the packaged recipes.

    # a few minutes on a CPU: cat-tiny on any folder of audio files
    python examples/pretrain.py --config tiny --data path/to/audio --output-dir cat-tiny-pretrained

    # the authors' CAT-base recipe on 4 GPUs (fp16, 400k steps, RR onto 512-d CLAP embeddings)
    accelerate launch --num_processes 4 examples/pretrain.py --config base --data path/to/audioset \
        --output-dir cat-base --rr-encoder cache:clap-cache

    # change anything in the recipe, continue after an interruption
    python examples/pretrain.py --config tiny --data audio --output-dir out --set learning_rate=5e-4 \
        --set model.clone_batch=8 --resume

The same runs from Python (here with a smaller clip and batch):

    from cat_hf.pretrain import PretrainConfig, pretrain
    config = PretrainConfig.from_yaml("tiny").with_overrides(
        {"data": "path/to/audio", "output_dir": "out", "batch_size": 2, "clip_seconds": 1.28})
    result = pretrain(config)          # result["metrics"]: one dict per step
    # then: import cat_hf; transformers.AutoModel.from_pretrained("out")
"""

import sys

from cat_hf.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
