"""Model building: layer specs (TE on GPUs, local modules elsewhere) and the MoST model."""
