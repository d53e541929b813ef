"""The data layer: readers, DPR-style passages, token-ID corpus, BM25, prepared datasets (docs/design.md)."""

from rnr_jax.data.bm25 import BM25Index
from rnr_jax.data.examples import (SplitCandidates, build_candidates, sample_reader_passages, sample_retriever_passages)
from rnr_jax.data.passages import PassageTable, gold_passages, split_documents, split_words
from rnr_jax.data.prepared import PreparedData, PreparedDataError, PrepareSettings, Source, prepare
from rnr_jax.data.readers import (DataFormatError, Document, ExcludedRecord, Question, ReadStats, read_corpus,
                                  read_questions)
from rnr_jax.data.token_corpus import RaggedArray, TokenCorpus, compress

__all__ = ["BM25Index", "DataFormatError", "Document", "ExcludedRecord", "PassageTable", "PrepareSettings",
           "PreparedData", "PreparedDataError", "Question", "RaggedArray", "ReadStats", "Source", "SplitCandidates",
           "TokenCorpus", "build_candidates", "compress", "gold_passages", "prepare", "read_corpus", "read_questions",
           "sample_reader_passages", "sample_retriever_passages", "split_documents", "split_words"]
