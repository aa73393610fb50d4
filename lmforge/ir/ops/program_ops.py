"""Program ops: decoding (`generate`), Archon-style compound ops (ensemble, rank, fuse, verify, vote) and
retrieval (`retrieve`: prompts in, longer prompts out, see lmforge.programs.retrieval).

Values between program ops are candidates: `tokens` int64 [batch, k, T] (k candidates of T tokens per
prompt, padded with EOS after they finish) and `scores` float32 [batch, k] (summed log-probabilities; -inf
marks a rejected candidate). Prompts are int64 [batch, L].

    %tok, %lp = generate(%prompts; model="tiny", strategy="best_of_n", n=8, aggregator="scorer", ...)
                region: the model's decode step graph (tokens [R,1], k_cache, v_cache) -> (logits, k, v)
    %tok2, %s2 = verify(%prompts, %tok, %lp; checker="addition_checker", first_k=1)
    %tok3, %s3 = vote(%tok2, %s2)

`rank`, `verify` and `fuse` take an optional region: a scoring model (its decode step), used when no
function is named. Checker and scorer functions are named, not stored (see lmforge.programs.functions).
Strategy-specific rules (a beam's width, an aggregator's scorer, Archon's layer rules) are checked by
`lmforge.programs.verify_program`. The registry cost of a program op is zero: what a program costs depends
on what it decoded, which `lmforge.programs.cost.program_cost` charges from the token accounting.
"""
from __future__ import annotations

import weakref
from types import SimpleNamespace

from lmforge.errors import VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.ops.registry import OpDef, attr
from lmforge.ir.types import TensorType

STRATEGIES = ("greedy", "sample", "beam", "diverse_beam", "best_of_n", "first_finish", "momentum", "trie_beam")
AGGREGATORS = ("vote", "scorer", "logprob")

GENERATE_ATTRS = {
    "model": attr("str", doc="name of the model whose decode step is the region"),
    "strategy": attr("str", "greedy", f"one of {STRATEGIES}"),
    "max_new_tokens": attr("int"),
    "eos_id": attr("int", -1, "end-of-sequence token (-1: none)"),
    "kv_shape": attr("ints", doc="(layers, kv_heads, head_dim) of the region's KV cache"),
    "kv_dtype": attr("str", "", "dtype of the region's KV cache, e.g. 'bfloat16' ('': float32)"),
    "n": attr("int", 1, "samples (sample, best_of_n, first_finish)"),
    "temperature": attr("float", 1.0),
    "top_p": attr("float", 1.0),
    "seed": attr("int", 0),
    "width": attr("int", 1, "beams (beam, diverse_beam, trie_beam)"),
    "groups": attr("int", 1, "diverse beam groups"),
    "diversity": attr("float", 0.0, "diverse beam Hamming penalty lambda"),
    "aggregator": attr("str", "vote", f"best_of_n: one of {AGGREGATORS}"),
    "scorer": attr("str", "", "best_of_n with aggregator scorer: a registered function name"),
    "alpha": attr("float", 0.0, "momentum penalty"),
    "max_ngram": attr("int", 2, "momentum: longest n-gram checked for loops"),
    "resistance": attr("floats", (1.0,), "momentum resistance table"),
    "catalog": attr("any", (), "trie_beam: the allowed token sequences"),
    "shared_prefix": attr("bool", True, "prefill the prompt once and share its KV cache among the rows"),
}


def num_candidates(a) -> int:
    s = a["strategy"]
    if s == "sample":
        return a["n"]
    if s in ("beam", "diverse_beam", "trie_beam"):
        return a["width"]
    return 1


def candidates(batch, k: int, T) -> list[TensorType]:
    return [TensorType((batch, k, T), "int64"), TensorType((batch, k), "float32")]


def _prompts_type(t, op: str) -> None:
    if t is None or t.rank != 2 or t.dtype != "int64":
        raise VerifyError(f"{op}: prompts must be int64 [batch, prompt_len], got {t}")


def _cand_types(tok, sc, op: str):
    if tok is None or tok.rank != 3 or tok.dtype != "int64" or sc is None or sc.rank != 2:
        raise VerifyError(f"{op}: expected candidates (int64 [batch, k, T], float32 [batch, k]), got {tok}, {sc}")
    return tok.shape


def _check_step_region(op: str, regions, a=None, required: bool = True) -> None:
    """regions: (decode step,) or (decode step, prefill): the prefill graph, when given, takes the whole prompt
    (tokens [B, S]) and returns (logits [B, S, V], k_cache, v_cache) in the step's cache layout."""
    if not regions:
        if required:
            raise VerifyError(f"{op} needs one region: the model's decode step graph")
        return
    if len(regions) > 2:
        raise VerifyError(f"{op} takes a decode step graph and optionally its prefill graph, got {len(regions)} "
                          "regions")
    from lmforge.passes.shard import whole_io_types   # a region split over GPUs is called with whole tensors

    if len(regions) == 2:
        (pre_in, pre_out), (step_in, _) = whole_io_types(regions[1]), whole_io_types(regions[0])
        if len(pre_in) != 1 or pre_in[0].rank != 2 or len(pre_out) < 3 or pre_out[1].rank != 5 or \
                len(step_in) < 2 or step_in[1].rank != 5 or \
                [pre_out[1].shape[i] for i in (0, 2, 4)] != [step_in[1].shape[i] for i in (0, 2, 4)]:
            raise VerifyError(f"{op}: the second region must be the model's prefill, tokens [batch, seq] -> "
                              f"(logits, k_cache, v_cache) with the decode step's cache layout; got inputs "
                              f"{[str(t) for t in pre_in]}, outputs {[str(t) for t in pre_out]}")
    r = regions[0]
    if len(r.inputs) != 3 or len(r.outputs) < 3:
        raise VerifyError(f"{op}: the region must be a decode step (tokens, k_cache, v_cache) -> (logits, k, v); "
                          f"it has {len(r.inputs)} inputs and {len(r.outputs)} outputs")
    if a is not None:
        ks = whole_io_types(r)[0][1].shape
        want = (ks[0], ks[2], ks[4]) if len(ks) == 5 else None
        if want is None or tuple(a["kv_shape"]) != tuple(want):
            raise VerifyError(f"{op}: kv_shape {tuple(a['kv_shape'])} does not match the region's k_cache {ks} "
                              f"(expected (layers, kv_heads, head_dim) = {want})")
        dtype = whole_io_types(r)[0][1].dtype
        if a.get("kv_dtype") and a["kv_dtype"] != dtype:
            raise VerifyError(f"{op}: kv_dtype {a['kv_dtype']!r} does not match the region's k_cache dtype "
                              f"{dtype!r}; set kv_dtype={dtype!r} (lmforge.programs.ProgramBuilder does)")


def _generate_infer(ins, a, regions):
    _prompts_type(ins[0], "generate")
    if len(ins) == 2:
        _prompts_type(ins[1], "generate")
        if ins[1].shape[0] != ins[0].shape[0]:
            raise VerifyError(f"generate: its scorer's prompts have batch {ins[1].shape[0]}, its prompts "
                              f"{ins[0].shape[0]}")
    _check_step_region("generate", regions, a)
    return candidates(ins[0].shape[0], num_candidates(a), a["max_new_tokens"])


def _ensemble_infer(ins, a, regions):
    if len(ins) % 2:
        raise VerifyError("ensemble takes pairs of (tokens, scores) inputs")
    shapes = [_cand_types(t, s, "ensemble") for t, s in zip(ins[0::2], ins[1::2])]
    if len({s[2] for s in shapes}) != 1:
        raise VerifyError(f"ensemble: candidates have different lengths T {[s[2] for s in shapes]}; "
                          "give every generator the same max_new_tokens")
    return candidates(shapes[0][0], sum(s[1] for s in shapes), shapes[0][2])


def _select_infer(op: str, k_out):
    def infer(ins, a, regions):
        _prompts_type(ins[0], op)
        batch, k, T = _cand_types(ins[1], ins[2], op)
        _check_step_region(op, regions, required=False)
        k2 = k_out(a, k)
        if isinstance(k, int) and k2 > k:
            raise VerifyError(f"{op}: top_k={k2} but only {k} candidates come in")
        return candidates(batch, k2, T)

    return infer


def _vote_infer(ins, a, regions):
    batch, _, T = _cand_types(ins[0], ins[1], "vote")
    return candidates(batch, 1, T)


def _program_cost(ins, attrs, outs) -> Cost:
    return Cost.of(0.0, 0.0, "program")


def _reference(op: str):
    """The torch reference of a program op: the runtime's node executor with no cache and no accounting. Its regions
    come compiled (callables), so the cache dtype is the node's `kv_dtype` and the vocabulary (for the prompt and
    candidate id checks) is found by one probe step per region, as the runtime does for a compiled region."""

    def ref(*inputs, regions=(), **attrs):
        import torch

        from lmforge.ir.types import torch_dtype
        from lmforge.programs.decoding import StepModel
        from lmforge.programs.runtime import ExecContext, run_node

        kv = attrs.get("kv_shape")
        dtype = torch_dtype(attrs["kv_dtype"]) if attrs.get("kv_dtype") else torch.float32

        def step_model(idx, region, prefix_len):
            shape = kv if kv else _region_kv_shape_unknown(op)
            return StepModel(regions[region], tuple(shape), dtype,
                             prefill_fn=regions[region + 1] if len(regions) > region + 1 else None)

        node = SimpleNamespace(op=op, attr=attrs, regions=regions)
        vocabs = {0: _probed_vocab(regions[0], lambda: step_model(0, 0, None))} if regions and op != "fuse" else {}
        return run_node(ExecContext(step_model, vocabs=vocabs), 0, node, list(inputs))

    return ref


# The vocabulary of each compiled step region the program ops' reference has probed (dropped with the region).
_PROBED_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probed_vocab(region, step_model) -> int:
    """The vocabulary of a compiled step region, by one probe step the first time it is asked for."""
    from lmforge.programs.runtime import vocab_size

    try:
        return _PROBED_VOCABS[region]
    except (KeyError, TypeError):   # TypeError: a callable that takes no weak reference (probed at every call)
        pass
    vocab = vocab_size(step_model(), region)
    try:
        _PROBED_VOCABS[region] = vocab
    except TypeError:
        pass
    return vocab


def _region_kv_shape_unknown(op):
    raise VerifyError(f"{op}: a scoring region needs the node's `kv_shape` attribute")


def _retrieve_infer(ins, a, regions):
    from lmforge.programs.retrieval import METHODS

    _prompts_type(ins[0], "retrieve")
    if a["method"] not in METHODS:
        raise VerifyError(f"retrieve: method must be one of {METHODS}, got {a['method']!r}")
    if not 1 <= a["k"] <= a["n_docs"] or a["doc_len"] < 1:
        raise VerifyError(f"retrieve: k={a['k']} documents of {a['doc_len']} tokens from a corpus of {a['n_docs']}: "
                          "k must be between 1 and the corpus size")
    if a["method"] == "embedding" and a["embed_dim"] < 1:
        raise VerifyError(f"retrieve: corpus {a['corpus']!r} has no encoder (embed_dim 0) for method 'embedding'")
    batch, length = ins[0].shape
    if a["insert_at"] < 0:
        raise VerifyError(f"retrieve: insert_at={a['insert_at']} must be a position >= 0 in the prompt (0: the "
                          "documents go before it)")
    if isinstance(length, int) and a["insert_at"] > length:
        raise VerifyError(f"retrieve: insert_at={a['insert_at']} is past the end of prompts of length {length}: give "
                          f"a position from 0 to {length}")
    grown = a["k"] * a["doc_len"]
    length = length + grown if isinstance(length, int) else f"{length} + {grown}"
    return [TensorType((batch, length), "int64"), TensorType((batch, a["k"]), "int64")]


RETRIEVE_ATTRS = {
    "corpus": attr("str", doc="a corpus registered with lmforge.programs.register_corpus"),
    "k": attr("int", 1, "documents to retrieve per prompt"),
    "method": attr("str", "overlap", "'overlap' (lexical) or 'embedding' (the corpus's encoder)"),
    "insert_at": attr("int", 0, "prompt position where the documents go"),
    "n_docs": attr("int", doc="the corpus's documents (checked at run time)"),
    "doc_len": attr("int", doc="tokens per document (checked at run time)"),
    "embed_dim": attr("int", 0, "the corpus's embedding width (0: no encoder)"),
    "fingerprint": attr("str", "", "digest of the corpus's documents, pad_id and embedding width (checked at run time; "
                                   "'': not checked)"),
}


_SCORED_EOS = attr("int", -1, "the candidates' end-of-sequence token: a scoring model scores each candidate up to "
                              "and including its first EOS (-1: all T tokens)")


def _cand_attrs(**extra):
    return {**extra, "kv_shape": attr("ints", (), "(layers, kv_heads, head_dim) of the scoring region, if any"),
            "kv_dtype": attr("str", "", "dtype of the scoring region's KV cache, e.g. 'bfloat16' ('': float32)")}


def ops() -> list[OpDef]:
    two = lambda a: 2  # noqa: E731
    return [
        OpDef("generate", "Decode a batch of prompts with a decoding strategy over the decode step in its region; "
                          "an optional second input: the prompts a best-of-N scorer reads (the program's own, when "
                          "the first are retrieval-augmented).",
              GENERATE_ATTRS, _generate_infer, _reference("generate"), _program_cost, arity=(1, 2),
              op_class="program", kind="program", num_outputs=two),
        OpDef("ensemble", "All candidates of several generators (inputs: tokens, scores, tokens, scores, ...).",
              {}, _ensemble_infer, _reference("ensemble"), _program_cost, arity=(2, None), op_class="program",
              kind="program", num_outputs=two),
        OpDef("rank", "The top_k candidates by log-probability, a scorer function, or a scoring model (region).",
              _cand_attrs(by=attr("str", "logprob", "logprob | a registered scorer name"), top_k=attr("int", 1),
                          eos_id=_SCORED_EOS),
              _select_infer("rank", lambda a, k: a["top_k"]), _reference("rank"), _program_cost, arity=(3, 3),
              op_class="program", kind="program", num_outputs=two),
        OpDef("verify", "Reject candidates a checker function (or a model, region) does not accept; early exit "
                        "after first_k accepted.",
              _cand_attrs(checker=attr("str", ""), first_k=attr("int", 0), threshold=attr("float", 0.5),
                          eos_id=_SCORED_EOS),
              _select_infer("verify", lambda a, k: k), _reference("verify"), _program_cost, arity=(3, 3),
              op_class="program", kind="program", num_outputs=two),
        OpDef("fuse", "One candidate fused from all accepted ones: by='vote', a token-level vote weighted by "
                      "the candidates' scores; by='model', Archon's generative fuser, the decode step in the region "
                      "reads the prompt and the candidates and writes a new answer.",
              _cand_attrs(by=attr("str", "vote", "'vote' or 'model' (a fuser model in the region)")),
              _select_infer("fuse", lambda a, k: 1), _reference("fuse"), _program_cost,
              arity=(3, 3), op_class="program", kind="program", num_outputs=two),
        OpDef("vote", "Majority vote over the accepted candidates.", {}, _vote_infer, _reference("vote"),
              _program_cost, arity=(2, 2), op_class="program", kind="program", num_outputs=two),
        OpDef("retrieve", "Retrieval-augmented prompts: the k documents of a registered corpus most relevant to each "
                          "prompt, inserted at insert_at (lmforge.programs.retrieval); also their ids [batch, k].",
              RETRIEVE_ATTRS, _retrieve_infer, _reference("retrieve"), _program_cost, arity=(1, 1),
              op_class="program", kind="program", num_outputs=two),
    ]
