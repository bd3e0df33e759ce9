"""EVAR (nttcslab/eval-audio-repr) wrapper for CAT models, via cat_hf.embeddings.

Drop-in steps (see README.md beside this file): copy this file to `evar/ar_cat.py` and `cat.yaml` to
`config/cat.yaml` of an EVAR checkout, `pip install cat-hf` into EVAR's environment, set `weight_file` to a CAT
model folder, then e.g. `python lineareval.py config/cat.yaml cremad`.

EVAR calls `forward(batch_audio)` with a (B, T) tensor at `sample_rate` on its device and trains a linear probe
on the (B, D) result; `encode_frames` gives the (B, D, T') frame embeddings that EVAR's frame-level tools expect.
"""

from cat_hf.embeddings import CATEmbedder
from evar.ar_base import BaseAudioRepr


class AR_CAT(BaseAudioRepr):
    def __init__(self, cfg):
        super().__init__(cfg=cfg)
        options = dict(cfg.get("cat_options") or {})
        self.embedder = CATEmbedder.from_pretrained(cfg.weight_file, **options)
        self.model = self.embedder.model  # a registered submodule: EVAR's .to(device) moves it
        if self.embedder.clip_embedding_size != cfg.feature_d:
            raise ValueError(
                f"feature_d is {cfg.feature_d} in the config but {cfg.weight_file} gives "
                f"{self.embedder.clip_embedding_size}-d clip embeddings; set feature_d: "
                f"{self.embedder.clip_embedding_size}."
            )

    def encode_frames(self, batch_audio):
        frames = self.embedder.frame_embeddings(batch_audio, sampling_rate=self.cfg.sample_rate)
        return frames.embeddings.to(batch_audio.device).transpose(1, 2)  # [B, T', D] -> [B, D, T']

    def forward(self, batch_audio):
        embeddings = self.embedder.clip_embeddings(batch_audio, sampling_rate=self.cfg.sample_rate)
        return embeddings.to(batch_audio.device)  # [B, D]
