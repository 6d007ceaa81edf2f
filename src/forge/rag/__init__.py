"""Retrieval-augmented generation: loaders, chunking, embedders, stores, retrieval."""
