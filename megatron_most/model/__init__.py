"""Floor 3: the MoST model on Megatron-Core: configuration and presets (`config`, with the one
field table `fields`), token layout (`vocab`), layer specs (TE on GPUs, local modules elsewhere),
the model with its audio paths (`most`), loss, layout arithmetic (`layout`), checkpoint helpers
(`checkpoint`) and the meta-device estimator (`estimate`). Imports `moe`, `platform`, `options`.
"""
