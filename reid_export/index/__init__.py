"""Gallery indexes for large galleries (faiss): build, shard, add, search, recall against exact."""

from .faiss_index import (KINDS, GalleryIndex, IndexParams, build_index, exact_topk, load_feature_set,
                          recall_at_k, require_faiss)

__all__ = ["KINDS", "GalleryIndex", "IndexParams", "build_index", "exact_topk", "load_feature_set", "recall_at_k",
           "require_faiss"]
