"""Model building blocks: shared layers, relative positions, and the encoder."""
