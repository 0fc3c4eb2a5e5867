"""The paper's experiments (Gloeckle et al. 2024): induction, polynomial arithmetic, bytes, the n sweep."""
