"""Training: the thin trainer loop and the jobs of each stage (stage 1, reference scores, stage 2)."""
