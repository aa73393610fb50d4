"""Retrieval in programs (retrieval-augmented generation): a registered corpus and the `retrieve` op's semantics.

    register_corpus("facts", documents, embed=embed)     # documents LongTensor [N, Ld]; embed optional
    b = ProgramBuilder("rag", models={"m": step})
    p = b.retrieve("facts", k=2, method="embedding", insert_at=1)
    graph = b.build(b.generate("m", prompts=p, max_new_tokens=3, eos_id=EOS))

A corpus is N documents of Ld token ids each (pad them to one length with a token of your choice). Like checker
functions, it is registered by name, because a program graph round-trips through JSON and a tensor of documents
or a Python encoder does not belong in it; the op records the corpus's shape and checks it at run time.

Scoring a prompt [L] against every document (ties go to the lower document index):
- method "overlap" (lexical): the number of distinct prompt tokens that occur in the document;
- method "embedding" (dense): embed(prompt) . embed(document), where `embed(tokens [n, len]) -> [n, E]` is the
  corpus's encoder (the documents are embedded once, when the corpus is registered).

The k best documents, best first, go into the prompt at position insert_at:
`prompt[:insert_at] + doc_1 + ... + doc_k + prompt[insert_at:]`, so a program's prompts grow by k * Ld tokens.

Cost (`retrieval_cost`, used by lmforge.programs.cost): per prompt, scoring streams the corpus (N x E fp32
embeddings, or N x Ld int64 ids) and does 2 N E (embedding) or N Ld L (overlap) operations, a roofline
estimate on the target (a brute-force scan: no index). The query's own embedding (the user's encoder) is not
charged. The longer prompt is charged where it is paid for: by the generate node that prefills it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.errors import LmforgeError

METHODS = ("overlap", "embedding")


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: torch.Tensor               # [N, Ld] int64
    embed: Callable | None = None         # tokens [n, len] -> [n, E]
    doc_embeddings: torch.Tensor | None = None  # [N, E] float32

    @property
    def n_docs(self) -> int:
        return int(self.documents.shape[0])

    @property
    def doc_len(self) -> int:
        return int(self.documents.shape[1])

    @property
    def embed_dim(self) -> int:
        return 0 if self.doc_embeddings is None else int(self.doc_embeddings.shape[1])


_CORPORA: dict[str, Corpus] = {}


def register_corpus(name: str, documents: torch.Tensor, embed: Callable | None = None) -> Corpus:
    """Make `documents` (LongTensor [N, Ld]) retrievable by programs as `name`; `embed(tokens [n, len]) ->
    [n, E]` enables method="embedding". Registering a name again replaces the corpus."""
    documents = torch.as_tensor(documents)
    if documents.dim() != 2 or documents.dtype != torch.long or documents.shape[0] < 1 or documents.shape[1] < 1:
        raise LmforgeError(f"corpus {name!r}: documents must be a LongTensor [n_docs >= 1, doc_len >= 1] (pad the "
                           f"documents to one length), got {documents.dtype} {tuple(documents.shape)}")
    doc_embeddings = None
    if embed is not None:
        with torch.no_grad():
            doc_embeddings = torch.as_tensor(embed(documents)).float()
        if doc_embeddings.dim() != 2 or doc_embeddings.shape[0] != documents.shape[0]:
            raise LmforgeError(f"corpus {name!r}: embed(documents) must return [n_docs, E] = "
                               f"[{documents.shape[0]}, E], got {tuple(doc_embeddings.shape)}")
    corpus = Corpus(name, documents.clone(), embed, doc_embeddings)
    _CORPORA[name] = corpus
    return corpus


def get_corpus(name: str) -> Corpus:
    from lmforge.programs.functions import lookup

    return lookup(_CORPORA, name, "corpus", f"lmforge.programs.register_corpus({name!r}, documents)")


def has_corpus(name: str) -> bool:
    return name in _CORPORA


def scores(prompts: torch.Tensor, corpus: Corpus, method: str) -> torch.Tensor:
    """Relevance of every document to every prompt: [B, N] float32 (see the module docstring)."""
    if method == "overlap":
        docs = corpus.documents
        # first occurrence of each prompt token, so that a repeated token counts once
        same = prompts[:, :, None] == prompts[:, None, :]                          # [B, L, L]
        first = ~torch.tril(same, diagonal=-1).any(-1)                              # [B, L]
        contains = (docs[None, :, :, None] == prompts[:, None, None, :]).any(2)    # [B, N, L]
        return (contains & first[:, None, :]).sum(-1).float()
    if method == "embedding":
        if corpus.embed is None:
            raise LmforgeError(f"corpus {corpus.name!r} has no encoder: register it with embed=... to retrieve "
                               "with method='embedding', or use method='overlap'")
        with torch.no_grad():
            q = torch.as_tensor(corpus.embed(prompts)).float()
        if q.shape != (prompts.shape[0], corpus.embed_dim):
            raise LmforgeError(f"corpus {corpus.name!r}: embed(prompts) returned {tuple(q.shape)}, expected "
                               f"[{prompts.shape[0]}, {corpus.embed_dim}]")
        return q @ corpus.doc_embeddings.T
    raise LmforgeError(f"retrieve: method must be one of {METHODS}, got {method!r}")


def retrieve(prompts: torch.Tensor, corpus: Corpus, k: int, method: str = "overlap", insert_at: int = 0):
    """The k most relevant documents of each prompt [B, L], best first, inserted at insert_at.
    Returns (prompts [B, L + k * Ld], document ids [B, k])."""
    if not 1 <= k <= corpus.n_docs:
        raise LmforgeError(f"retrieve: k={k} must be between 1 and the corpus's {corpus.n_docs} documents")
    if not 0 <= insert_at <= prompts.shape[1]:
        raise LmforgeError(f"retrieve: insert_at={insert_at} is outside prompts of length {prompts.shape[1]}")
    s = scores(prompts, corpus, method)
    ids = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]       # ties: lower index first
    docs = corpus.documents[ids].reshape(prompts.shape[0], -1)
    return torch.cat([prompts[:, :insert_at], docs, prompts[:, insert_at:]], 1), ids


def retrieval_cost(attrs, prompt_len: int):
    """Cost (lmforge.ir.cost.Cost) of scoring one prompt against the corpus (module docstring)."""
    from lmforge.ir.cost import Cost

    n, ld, e = attrs["n_docs"], attrs["doc_len"], attrs["embed_dim"]
    if attrs["method"] == "embedding":
        return Cost.of(2.0 * n * e, 4.0 * n * e, "reduction", "float32")
    return Cost.of(float(n * ld * prompt_len), 8.0 * n * ld, "reduction", "float32")
