"""EDM2's magnitude-preserving networks (Karras et al. 2024)."""
