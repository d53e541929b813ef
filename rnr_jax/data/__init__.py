"""The data layer: readers, DPR-style passages, token-ID corpus, BM25, prepared datasets (docs/design.md)."""

from rnr_jax.data.examples import sample_retriever_passages
from rnr_jax.data.prepared import PreparedData, Source, prepare
from rnr_jax.data.readers import Question
from rnr_jax.data.token_corpus import TokenCorpus

__all__ = ["PreparedData", "Question", "Source", "TokenCorpus", "prepare", "sample_retriever_passages"]
