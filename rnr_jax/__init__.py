"""rnr-jax: minimal retrieve-and-read open-domain QA in JAX/Flax.

Library layout:

* ``rnr_jax.models``     Flax encoders (BERT, MobileBERT) and Hugging Face conversion.
* ``rnr_jax.tokenization`` question / passage / reader layouts and length buckets.
* ``rnr_jax.data``       readers, DPR-style passages, token-ID corpus, BM25, prepared datasets.
* ``rnr_jax.metrics``    EM/F1, DPR ``has_answer`` and top-k accuracy.
* ``rnr_jax.training``   mesh and sharding rules, optimiser, jitted steps, Orbax checkpoints.

Entry points live in ``train/`` (training stages) and ``infer/`` (encoding, search, demos).
"""

__version__ = "0.1.0"
