"""Training: the synthetic captioned scenes (`data`), their model-free evaluator (`evaluate`), and the
recipe that makes the embedded default model, in three stages run by `mobilediffusion train`:
(a) `autoencoder`: the lite autoencoder; (b) `diffusion`: the UNet and CLIP text encoder;
(c) `gan`: the DiffusionGAN fine-tune to one step. `benchmark` scores a model on held-out captions.
Stage configs: `config` (+ configs/<stage>.json); the shared loop and checkpoints: `loop`.

Importing this package loads nothing; `data`, `evaluate` and `config` need numpy + PIL only.
"""
