"""rnr-jax: minimal retrieve-and-read open-domain QA in JAX/Flax (the library; ``train/`` and ``infer/`` hold the
entry points, docs/design.md the design)."""

__version__ = "0.1.0"
