"""Retrieval in programs (retrieval-augmented generation): a registered corpus and the `retrieve` op's semantics.

    register_corpus("facts", documents, embed=embed)     # documents LongTensor [N, Ld]; embed optional
    b = ProgramBuilder("rag", models={"m": step})
    p = b.retrieve("facts", k=2, method="embedding", insert_at=1)
    graph = b.build(b.generate("m", prompts=p, max_new_tokens=3, eos_id=EOS))

A corpus is N documents of Ld token ids each (pad them to one length with a token of your choice, and name it
with pad_id= so that overlap scoring does not count it). Like checker functions, it is registered by name,
because a program graph round-trips through JSON and a tensor of documents or a Python encoder does not belong
in it; the op records the corpus's shape and fingerprint (a digest of its documents, pad_id and embedding width),
and the runtime refuses a corpus registered under that name since that differs from the one the program was
built (and tuned) with.

Scoring a prompt [L] against every document (ties go to the lower document index):
- method "overlap" (lexical): the number of distinct prompt tokens that occur in the document (the corpus's
  pad_id, if any, never counts);
- method "embedding" (dense): embed(prompt) . embed(document), where `embed(tokens [n, len]) -> [n, E]` is the
  corpus's encoder (the documents are embedded once, when the corpus is registered). Each prompt's dot products
  are computed on their own, so a prompt retrieves the same documents whatever prompts share its batch; for
  that to hold end to end, the encoder must give a prompt the same embedding in any batch. An encoder that
  returns NaN or inf (for a document at registration, or for a prompt) is an error.

The k best documents, best first, go into the prompt at position insert_at:
`prompt[:insert_at] + doc_1 + ... + doc_k + prompt[insert_at:]`, so a program's prompts grow by k * Ld tokens.

Cost (`retrieval_cost`, used by lmforge.programs.cost): per prompt, scoring streams the corpus (N x E fp32
embeddings, or N x Ld int64 ids) and does 2 N E (embedding) or N Ld L (overlap) operations, a roofline
estimate on the target (a brute-force scan: no index). The query's own embedding (the user's encoder) is not
charged. The longer prompt is charged where it is paid for: by the generate node that prefills it.
"""
from __future__ import annotations

import functools
import hashlib
import operator
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
    pad_id: int | None = None             # the documents' padding token: overlap scoring does not count it
    fingerprint: str = ""                 # corpus_fingerprint(documents, doc_embeddings, pad_id)

    @property
    def n_docs(self) -> int:
        return int(self.documents.shape[0])

    @property
    def doc_len(self) -> int:
        return int(self.documents.shape[1])

    @property
    def embed_dim(self) -> int:
        return 0 if self.doc_embeddings is None else int(self.doc_embeddings.shape[1])

    @functools.cached_property
    def overlap_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, owner): every document's distinct tokens but pad_id, sorted, and the document each comes from;
        built once per corpus (overlap scoring searches it for each prompt)."""
        docs = self.documents.sort(1).values
        distinct = torch.ones_like(docs, dtype=torch.bool)
        distinct[:, 1:] = docs[:, 1:] != docs[:, :-1]            # a token's first place in its sorted document
        if self.pad_id is not None:
            distinct &= docs != self.pad_id
        tokens = docs[distinct]                                  # row by row, so document i's come i-th
        owner = torch.arange(self.n_docs).repeat_interleave(distinct.sum(1))
        order = tokens.argsort()
        return tokens[order], owner[order]


_CORPORA: dict[str, Corpus] = {}
_PAD_HINT = "pad the documents to one length with a token of your choice (and pass it as pad_id=)"


def register_corpus(name: str, documents, embed: Callable | None = None, pad_id: int | None = None) -> Corpus:
    """Make `documents` (LongTensor [N, Ld], or a list of N rows of Ld token ids) retrievable by programs as
    `name`; `embed(tokens [n, len]) -> [n, E]` enables method="embedding"; pad_id: the token the documents are
    padded with, which overlap scoring then does not count. Registering a name again replaces the corpus."""
    if not isinstance(name, str) or not name:
        raise LmforgeError(f"register_corpus: the corpus name must be a non-empty string, got {name!r}")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        raise LmforgeError(f"corpus {name!r}: pad_id must be a token id (int) or None, got {pad_id!r}")
    documents = _as_documents(name, documents)
    doc_embeddings = None
    if embed is not None:
        with torch.no_grad():
            doc_embeddings = torch.as_tensor(embed(documents)).detach().to(torch.float32, copy=True)
        if doc_embeddings.dim() != 2 or doc_embeddings.shape[0] != documents.shape[0]:
            raise LmforgeError(f"corpus {name!r}: embed(documents) must return [n_docs, E] = "
                               f"[{documents.shape[0]}, E], got {tuple(doc_embeddings.shape)}")
        bad = _non_finite_rows(doc_embeddings)
        if bad:
            raise LmforgeError(f"corpus {name!r}: embed(documents) returned NaN or inf for documents {bad} (a NaN "
                               "score sorts first, so such a document would be retrieved for every prompt): fix "
                               "the encoder (e.g. a normalisation that divides by the norm of an all-padding "
                               "document) or leave those documents out")
    documents = documents.clone()
    corpus = Corpus(name, documents, embed, doc_embeddings, pad_id,
                    corpus_fingerprint(documents, doc_embeddings, pad_id))
    _CORPORA[name] = corpus
    return corpus


def _as_documents(name: str, documents) -> torch.Tensor:
    """The documents as a LongTensor [N >= 1, Ld >= 1], or an LmforgeError saying how to make them one."""
    if isinstance(documents, (list, tuple)) and documents and all(isinstance(d, torch.Tensor) for d in documents):
        shapes = sorted({tuple(d.shape) for d in documents})
        if len(shapes) > 1:
            raise LmforgeError(f"corpus {name!r}: the documents have different shapes {shapes[:5]}: {_PAD_HINT}")
        documents = torch.stack(list(documents))
    try:
        documents = torch.as_tensor(documents)
    except (TypeError, ValueError, RuntimeError) as e:
        raise LmforgeError(f"corpus {name!r}: documents must be a LongTensor [n_docs, doc_len] or a list of rows "
                           f"of one length ({e}): {_PAD_HINT}") from None
    if documents.dim() != 2 or documents.shape[0] < 1 or documents.shape[1] < 1:
        raise LmforgeError(f"corpus {name!r}: documents must be a LongTensor [n_docs >= 1, doc_len >= 1], got "
                           f"{documents.dtype} {tuple(documents.shape)}: {_PAD_HINT}")
    if documents.dtype != torch.long:
        raise LmforgeError(f"corpus {name!r}: documents must be int64 token ids (a LongTensor), got "
                           f"{documents.dtype}: convert them with .long()")
    return documents


def corpus_fingerprint(documents: torch.Tensor, doc_embeddings: torch.Tensor | None, pad_id: int | None) -> str:
    """sha256 of what a corpus is (16 hex digits, like Hardware.fingerprint): its documents (token ids), pad_id and
    the shape of its embeddings. Not the embeddings' values: the same encoder gives floats that differ in the last
    bits with the thread count or the BLAS, which must not make a program refuse its own corpus (so a changed
    encoder of the same width is not caught). Computed once, at registration; a retrieve node records it and the
    runtime compares."""
    h = hashlib.sha256(f"{tuple(documents.shape)}:{pad_id}".encode())
    h.update(documents.cpu().contiguous().numpy().tobytes())
    if doc_embeddings is not None:
        h.update(str(tuple(doc_embeddings.shape)).encode())
    return h.hexdigest()[:16]


def _non_finite_rows(x: torch.Tensor) -> str:
    """The rows of x [n, E] holding NaN or inf ("" if none), as a short list for an error message."""
    rows = (~torch.isfinite(x)).any(1).nonzero().flatten().tolist()
    return "" if not rows else f"{rows[:10]}{' ...' if len(rows) > 10 else ''} ({len(rows)} of {x.shape[0]})"


def get_corpus(name: str) -> Corpus:
    from lmforge.programs.functions import lookup

    return lookup(_CORPORA, name, "corpus", f"lmforge.programs.register_corpus({name!r}, documents)")


def has_corpus(name: str) -> bool:
    return name in _CORPORA


def scores(prompts: torch.Tensor, corpus: Corpus, method: str) -> torch.Tensor:
    """Relevance of every document to every prompt: [B, N] float32 (see the module docstring). Each prompt's row is
    computed on its own, so it does not depend on the other prompts of the batch."""
    if method == "overlap":
        return _overlap_scores(prompts, corpus)
    if method == "embedding":
        if corpus.embed is None:
            raise LmforgeError(f"corpus {corpus.name!r} has no encoder: register it with embed=... to retrieve "
                               "with method='embedding', or use method='overlap'")
        with torch.no_grad():
            q = torch.as_tensor(corpus.embed(prompts)).float()
        if q.shape != (prompts.shape[0], corpus.embed_dim):
            raise LmforgeError(f"corpus {corpus.name!r}: embed(prompts) returned {tuple(q.shape)}, expected "
                               f"[{prompts.shape[0]}, {corpus.embed_dim}]")
        bad = _non_finite_rows(q)
        if bad:
            raise LmforgeError(f"corpus {corpus.name!r}: the encoder returned NaN or inf for prompts {bad} "
                               "(embed(prompts)): fix the encoder for such prompts (e.g. a normalisation that "
                               "divides by a zero norm)")
        # prompt by prompt, not q @ D.T: a matrix product rounds differently with the number of rows, so a near-tie
        # between two documents could flip with the batch (and batch_prompts=False would retrieve other documents)
        rows = [(corpus.doc_embeddings * row).sum(1) for row in q]
        return torch.stack(rows) if rows else q.new_zeros(0, corpus.n_docs)
    raise LmforgeError(f"retrieve: method must be one of {METHODS}, got {method!r}")


def _overlap_scores(prompts: torch.Tensor, corpus: Corpus) -> torch.Tensor:
    """Per prompt, the number of distinct tokens (but pad_id) each document shares with it, from an inverted index
    (`Corpus.overlap_index`): every document's distinct tokens, sorted, with the document each comes from; a
    prompt's distinct tokens find their runs in it by binary search, and the documents of those runs are counted
    (memory N x Ld, time per prompt L log(N Ld) plus the matches, instead of a B x N x Ld x L comparison)."""
    tokens, owner = corpus.overlap_index
    out = torch.empty(prompts.shape[0], corpus.n_docs)
    for b in range(prompts.shape[0]):
        u = prompts[b].unique()
        lo = torch.searchsorted(tokens, u)
        n = torch.searchsorted(tokens, u, right=True) - lo    # documents holding each prompt token
        at = torch.repeat_interleave(lo - (n.cumsum(0) - n), n) + torch.arange(int(n.sum()))
        out[b] = torch.bincount(owner[at], minlength=corpus.n_docs).float()
    return out


def _index(what: str, v) -> int:
    """v as an int (a Python, NumPy or 0-d tensor integer, not a bool), or an LmforgeError naming `what`."""
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise LmforgeError(f"retrieve: {what} must be an int, got {v!r} ({type(v).__name__})")


def retrieve(prompts: torch.Tensor, corpus: Corpus, k: int, method: str = "overlap", insert_at: int = 0):
    """The k most relevant documents of each prompt [B, L], best first, inserted at insert_at.
    Returns (prompts [B, L + k * Ld], document ids [B, k])."""
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.dtype != torch.long:
        got = f"{prompts.dtype} {tuple(prompts.shape)}" if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise LmforgeError(f"retrieve: prompts must be a LongTensor [batch, prompt_len] of token ids, got {got} "
                           "(one prompt p: p[None])")
    k, insert_at = _index("k", k), _index("insert_at", insert_at)
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
