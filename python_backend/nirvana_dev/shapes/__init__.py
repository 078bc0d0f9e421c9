"""The shapes model: a text-to-image task whose correctness a program can check, small enough to train on a CPU.

``scenes``: captioned scenes of one coloured shape, their paraphrases and near misses; ``text_pretrain``: the text
encoder's contrastive pre-training on captions; ``train``: the VAE, text encoder and UNet trained within a time
budget into a diffusers checkpoint, with its ``judge`` (a classifier that reads the five attributes back from an
image). `nirvana demo` trains one once and serves it; `nirvana-quality` measures what cache hits do with it.
"""
