"""Write programs in Python; get a program graph (verified like any graph, plus Archon's rules).

    b = ProgramBuilder("best_of_8", models={"tiny": step_graph})        # step_graph: a captured decode step
    c = b.generate("tiny", strategy="sample", n=8, temperature=0.8, max_new_tokens=4, eos_id=12)
    c = b.verify(c, checker="addition_checker", first_k=1)
    graph = b.build(b.vote(c))

or, as a decorator:

    @program("best_of_8")
    def best_of_8(b):
        return b.vote(b.verify(b.generate("tiny", strategy="sample", n=8, max_new_tokens=4), checker="..."))
    graph = best_of_8(models={"tiny": step_graph})

Each model's decode-step graph becomes the region of the nodes that use it; its parameters are renamed
`<model>::<name>` so several models live in one program, and their weights go into the program graph's
weights (the compiler compiles regions against them). Checkers and scorers are named (registered in
lmforge.programs.functions), because a program graph round-trips through JSON and a callable cannot.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from lmforge.errors import LmforgeError, VerifyError
from lmforge.ir.graph import Graph, GraphBuilder, Value
from lmforge.ir.types import TensorType
from lmforge.ir.verify import verify


@dataclass(frozen=True)
class Candidates:
    """A handle on a program value: candidate tokens [batch, k, T] and their scores [batch, k]."""

    tokens: Value
    scores: Value

    @property
    def k(self) -> int:
        return self.tokens.type.shape[1]


def prefix_params(graph: Graph, prefix: str) -> Graph:
    """The same graph with every parameter renamed `<prefix>::<name>` (weights too)."""
    new = {p.name: Value(f"{prefix}::{p.name}", p.type) for p in graph.params}
    nodes = [replace(n, inputs=tuple(None if v is None else new.get(v.name, v) for v in n.inputs))
             for n in graph.nodes]
    weights = {new[k].name: w for k, w in graph.weights.items() if k in new}
    return replace(graph, params=tuple(new[p.name] for p in graph.params), nodes=tuple(nodes), weights=weights)


def _same_tensor(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all()))


def kv_shape_of(step: Graph) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the whole KV cache a decode step takes (also when split over GPUs)."""
    from lmforge.passes.shard import whole_io_types

    shape = whole_io_types(step)[0][1].shape if len(step.inputs) > 1 else ()
    if len(step.inputs) != 3 or len(shape) != 5:
        raise LmforgeError(f"graph {step.name!r} is not a decode step (tokens, k_cache, v_cache): "
                           "capture the model's decode step, e.g. LlamaDecodeStep, with a dynamic 'past' dim")
    return int(shape[0]), int(shape[2]), int(shape[4])


def kv_dtype_of(step: Graph) -> str:
    """The dtype of the KV cache a decode step takes (its k_cache input), e.g. "bfloat16": a cache the runtime
    starts empty (no prefill region) must have it."""
    from lmforge.passes.shard import whole_io_types

    kv_shape_of(step)   # a decode step, or a clear error
    return whole_io_types(step)[0][1].dtype


def catalog_entries(catalog) -> tuple[tuple[int, ...], ...]:
    """A trie_beam catalog as a tuple of token-id tuples, e.g. [[5, 12], (5, 6, 12)] -> ((5, 12), (5, 6, 12));
    an LmforgeError when it is not a list of token-id sequences (ints, or integer tensors of one element)."""
    import operator

    def items(seq) -> list:
        if isinstance(seq, (str, bytes)):
            raise TypeError(seq)
        return list(seq)    # TypeError when not iterable

    def token(t) -> int:
        if isinstance(t, bool):
            raise TypeError(t)
        return operator.index(t)   # TypeError for strings, floats, float tensors

    try:
        return tuple(tuple(token(t) for t in items(e)) for e in items(catalog))
    except TypeError:
        raise LmforgeError(f"catalog must be a list of token-id sequences, e.g. [(5, 12), (5, 6, 12)] (each entry "
                           f"the ids of one allowed output), got {catalog!r:.120}") from None


class ProgramBuilder:
    """Builds a program graph; see the module docstring."""

    def __init__(self, name: str, models: Mapping[str, Graph], prompt_len: int | str = "prompt_len",
                 prefills: Mapping[str, Graph] | None = None):
        """models: name -> decode step graph; prefills: name -> that model's prefill graph (tokens [B, S] ->
        logits, k_cache, v_cache; e.g. a captured LlamaPrefill), so the nodes that run the model prefill a
        prompt in one call and are charged one prefill instead of a token-by-token feed. The prefill must compute
        what the step computes (same weights: their parameter names must match the step's)."""
        for m, g in {**dict(models), **dict(prefills or {})}.items():
            if not isinstance(g, Graph):
                raise LmforgeError(f"model {m!r} is a {type(g).__name__}, not a graph: capture its decode step (and "
                                   "prefill) first, e.g. lmforge.capture(LlamaDecodeStep(model), example_inputs, "
                                   "dynamic=...)")
        for m, g in (prefills or {}).items():
            if len(g.inputs) == 1 and not all(isinstance(d, str) for d in g.inputs[0].type.shape):
                raise LmforgeError(f"the prefill graph of {m!r} takes tokens {g.inputs[0].type}: capture it with "
                                   "dynamic batch and sequence dims (dynamic={'tokens': {0: 'batch', 1: 'seq'}}) so "
                                   "it takes any number of prompts of any length")
        self._b = GraphBuilder(name)
        self.prompts = self._b.input("prompts", TensorType(("batch", prompt_len), "int64"))
        self.models = {m: prefix_params(g, m) for m, g in models.items()}
        unknown = sorted(set(prefills or {}) - set(models))
        if unknown:
            raise LmforgeError(f"prefill graphs for {unknown}, which are not among the models {sorted(models)}")
        self.prefills = {m: prefix_params(g, m) for m, g in (prefills or {}).items()}
        for m, g in self.prefills.items():
            step, step_params = self.models[m], {p.name: p.type for p in self.models[m].params}
            clash = [p.name for p in g.params if p.name in step_params and (
                step_params[p.name] != p.type or not _same_tensor(g.weights.get(p.name), step.weights.get(p.name)))]
            missing = [p.name for p in g.params if p.name not in step_params]
            if clash or missing:
                raise LmforgeError(f"the prefill graph of {m!r} must use the decode step's weights: parameters "
                                   f"{(clash + missing)[:3]} differ from or are not in the step (capture both from "
                                   "one model, after the same passes)")
        for g in (*self.models.values(), *self.prefills.values()):
            self._b.weights.update(g.weights)

    def _region(self, model: str) -> Graph:
        if model not in self.models:
            raise LmforgeError(f"program uses model {model!r} but only {sorted(self.models)} were given")
        return self.models[model]

    def _regions(self, model: str) -> tuple[Graph, ...]:
        """The model's decode step, and its prefill graph when one was given."""
        return (self._region(model),) + ((self.prefills[model],) if model in self.prefills else ())

    def _op(self, op: str, inputs, attrs, regions=()) -> Candidates:
        tok, sc = self._b.op(op, list(inputs), attrs, regions=regions, name=op)
        return Candidates(tok, sc)

    def retrieve(self, corpus: str, k: int = 1, method: str = "overlap", insert_at: int = 0,
                 prompts: Value | None = None) -> Value:
        """Prompts with the k documents of a registered corpus most relevant to each inserted at insert_at
        (lmforge.programs.retrieval); pass the result as `prompts=` to generate (or rank / verify / fuse). The node
        records the corpus's shape and fingerprint: running the program with another corpus under that name is an
        error."""
        from lmforge.programs.retrieval import get_corpus

        c = get_corpus(corpus)
        attrs = {"corpus": corpus, "k": k, "method": method, "insert_at": insert_at, "n_docs": c.n_docs,
                 "doc_len": c.doc_len, "embed_dim": c.embed_dim, "fingerprint": c.fingerprint}
        out, _ids = self._b.op("retrieve", [self.prompts if prompts is None else prompts], attrs, name="retrieve")
        return out

    def generate(self, model: str, *, max_new_tokens: int, strategy: str = "greedy", prompts: Value | None = None,
                 **attrs) -> Candidates:
        """Decode the program's prompts (or `prompts`, e.g. from retrieve) with a strategy over the model's step.

        A best-of-N scorer (aggregator="scorer") reads the program's own prompts, as rank, verify and fuse do by
        default: given retrieval-augmented `prompts`, the node also takes the program's prompts (a second input)
        for its scorer, which so sees the user's prompt without the documents. (For a scorer that should read the
        documents, sample and then rank(..., by=scorer, prompts=<the retrieved prompts>).)"""
        region = self._region(model)
        attrs = dict(attrs, model=model, strategy=strategy, max_new_tokens=max_new_tokens,
                     kv_shape=kv_shape_of(region), kv_dtype=kv_dtype_of(region))
        if "catalog" in attrs:
            attrs["catalog"] = catalog_entries(attrs["catalog"])
        inputs = [self.prompts if prompts is None else prompts]
        if attrs.get("aggregator") == "scorer" and inputs[0].name != self.prompts.name:
            inputs.append(self.prompts)
        return self._op("generate", inputs, attrs, self._regions(model))

    def ensemble(self, *parts: Candidates) -> Candidates:
        return self._op("ensemble", [v for c in parts for v in (c.tokens, c.scores)], {})

    def _scored(self, op: str, c: Candidates, attrs, model: str | None, prompts: Value | None = None) -> Candidates:
        regions = self._regions(model) if model else ()
        if model:
            attrs = dict(attrs, kv_shape=kv_shape_of(regions[0]), kv_dtype=kv_dtype_of(regions[0]))
        return self._op(op, [self.prompts if prompts is None else prompts, c.tokens, c.scores], attrs, regions)

    def _upstream_eos(self, c: Candidates) -> int:
        """The eos_id of the generate nodes the candidates come from, when they agree (else -1)."""
        producers = {v.name: n for n in self._b._nodes for v in n.outputs}
        found, todo = set(), [c.tokens]
        while todo:
            node = producers.get(todo.pop().name)
            if node is None:
                continue
            if node.op == "generate":
                found.add(node.attr["eos_id"])
            else:
                todo += [v for v in node.inputs if v is not None and v.type.rank == 3]
        return found.pop() if len(found) == 1 else -1

    def rank(self, c: Candidates, by: str = "logprob", top_k: int = 1, model: str | None = None,
             prompts: Value | None = None, eos_id: int | None = None) -> Candidates:
        """The top_k candidates; with a scoring model, by its log-probability of each up to its EOS (eos_id:
        by default the eos_id of the generate nodes the candidates come from)."""
        eos = self._upstream_eos(c) if eos_id is None else eos_id
        return self._scored("rank", c, {"by": by, "top_k": top_k, "eos_id": eos}, model, prompts)

    def verify(self, c: Candidates, checker: str = "", first_k: int = 0, threshold: float = 0.5,
               model: str | None = None, prompts: Value | None = None, eos_id: int | None = None) -> Candidates:
        """Reject the candidates a checker function (or, with model=, a scoring model: mean log-probability per
        token up to the candidate's EOS below log(threshold)) does not accept; eos_id as for rank."""
        eos = self._upstream_eos(c) if eos_id is None else eos_id
        return self._scored("verify", c, {"checker": checker, "first_k": first_k, "threshold": threshold,
                                          "eos_id": eos}, model, prompts)

    def fuse(self, c: Candidates, by: str = "vote", model: str | None = None,
             prompts: Value | None = None) -> Candidates:
        """One answer from the candidates. by="vote": a token-level vote weighted by the candidates' scores
        (no model). by="model": Archon's generative fuser: `model` (a decode step whose vocabulary is the
        task's plus a separator, its last id) reads "prompt SEP cand_1 ... SEP cand_k SEP" and writes a new
        answer of the candidates' length (lmforge.programs.compound.fuse_by_model)."""
        if by not in ("vote", "model"):
            raise LmforgeError(f"fuse: by must be 'vote' or 'model', got {by!r}")
        if by == "model" and not model:
            raise LmforgeError("fuse(by='model') needs model=<the fuser's name in models>")
        if by == "vote" and model:
            raise LmforgeError("fuse(by='vote') takes no model; a fuser model generates: use by='model'")
        if by == "model" and c.k == 0:
            raise LmforgeError("a fuser model needs candidates to read, but none come in (Archon: fuse after a "
                               "generating layer)")
        return self._scored("fuse", c, {"by": by}, model, prompts)

    def vote(self, c: Candidates) -> Candidates:
        return self._op("vote", [c.tokens, c.scores], {})

    def build(self, out: Candidates) -> Graph:
        """The program graph computing `out`; nodes it does not need (a generate whose candidates nothing reads)
        are left out, so they are neither run nor charged."""
        from lmforge.passes.canonical import dce

        whole = self._b.build([out.tokens, out.scores])
        graph = dce(whole)
        kept = {v.name for n in graph.nodes for v in n.outputs}
        unread = [n.attr["corpus"] for n in whole.nodes if n.op == "retrieve" and n.outputs[0].name not in kept]
        if unread:
            warnings.warn(f"retrieve from corpus {unread} is left out: nothing reads its prompts (pass "
                          "prompts=<the retrieve's output> to generate, rank, verify or fuse)", stacklevel=2)
        return verify_program(verify(graph))


def program(name: str):
    """Decorator: `fn(builder) -> Candidates` becomes `fn(models=..., prompt_len=..., prefills=...) -> program
    Graph`."""

    def wrap(fn: Callable[[ProgramBuilder], Candidates]):
        @functools.wraps(fn)
        def build(models: Mapping[str, Graph], prompt_len: int | str = "prompt_len",
                  prefills: Mapping[str, Graph] | None = None) -> Graph:
            b = ProgramBuilder(name, models, prompt_len, prefills)
            return b.build(fn(b))

        return build

    return wrap


def verify_program(graph: Graph) -> Graph:
    """Archon's construction rules and the strategies' own rules; raises VerifyError naming the node.

    - the first layer generates: every ensemble/rank/fuse/verify/vote reads candidates made (through any
      chain) by a generate node, and a program has at least one generate node;
    - a verifier needs candidates: verify/rank need >= 1 candidate coming in (fuse and vote need >= 1 too),
      and verify needs a checker function or a model region; a fuse with a model (by="model") is a
      generative fuser and needs >= 1 candidate to read;
    - a scoring or fuser model's vocabulary covers the generators' whose candidates it reads;
    - a retrieve names a registered corpus;
    - strategies: beam widths >= 1, diverse beam width divisible by groups and diversity >= 0, n >= 1, a
      best_of_n with aggregator "scorer" names a registered function, momentum's max_ngram >= 2, alpha >= 0 and
      a non-empty resistance table >= 0, a trie beam has a non-empty catalog of token-id sequences, and
      without an eos_id entries of max_new_tokens tokens.
    """
    from lmforge.ir.ops.program_ops import AGGREGATORS, STRATEGIES
    from lmforge.programs.functions import has_function
    from lmforge.programs.retrieval import has_corpus

    producers = graph.producers()
    if not any(n.op == "generate" for n in graph.nodes):
        raise VerifyError(f"program {graph.name!r} has no generate node: Archon's first layer must generate "
                          "candidates (add b.generate(...))")
    for i, n in enumerate(graph.nodes):
        where = f"program {graph.name!r}, node {i} ({n.op})"
        a = n.attr
        if n.op == "generate":
            _check_generate(a, where, STRATEGIES, AGGREGATORS, has_function)
            _check_token_ids(a, where, n.regions[0] if n.regions else None)
            continue
        if n.op == "retrieve" and not has_corpus(a["corpus"]):
            raise VerifyError(f"{where}: corpus {a['corpus']!r} is not registered; register it with "
                              "lmforge.programs.register_corpus first")
        if n.op not in ("ensemble", "rank", "fuse", "verify", "vote"):
            continue
        cand_inputs = [v for v in n.inputs if v is not None and v.type.dtype == "int64" and v.type.rank == 3]
        for v in cand_inputs:
            src = producers.get(v.name)
            if src is None:
                raise VerifyError(f"{where}: its candidates %{v.name} come from outside the program; Archon's "
                                  "first layer must be a generate node")
            if v.type.shape[1] == 0:
                what = "a fuser model" if n.op == "fuse" and a["by"] == "model" else f"a {n.op}"
                raise VerifyError(f"{where}: {what} needs candidates, but none come in")
        if n.op == "fuse" and (a["by"] == "model") != bool(n.regions):
            raise VerifyError(f"{where}: fuse(by={a['by']!r}) " + ("needs a fuser model region" if a["by"] == "model"
                                                                   else "takes no model region (use by='model')"))
        if n.op == "fuse" and n.regions and n.regions[0].outputs[0].type.shape[-1] in (0, 1):
            raise VerifyError(f"{where}: a fuser model needs a vocabulary of the task's tokens plus a separator")
        if n.regions:
            _check_reader_vocab(graph, n, where)
        if n.op == "verify" and not a["checker"] and not n.regions:
            raise VerifyError(f"{where}: a verifier needs a checker function (checker=...) or a model (model=...)")
        if n.op == "verify" and a["checker"] and n.regions:
            raise VerifyError(f"{where}: give a verifier a checker function or a model, not both")
        if n.op == "rank" and n.regions and a["by"] != "logprob":
            raise VerifyError(f"{where}: rank by a scorer function ({a['by']!r}) or by a model, not both")
        if n.op == "rank" and a["top_k"] < 1:
            raise VerifyError(f"{where}: rank needs top_k >= 1, got {a['top_k']}")
        if n.op == "verify" and a["first_k"] < 0:
            raise VerifyError(f"{where}: first_k must be >= 0 (0: check every candidate), got {a['first_k']}")
        if n.op == "verify" and n.regions and not 0.0 < a["threshold"] <= 1.0:
            raise VerifyError(f"{where}: a model verifier's threshold is a per-token probability in (0, 1], got "
                              f"{a['threshold']}")
        for fn_attr in ("checker",) if n.op == "verify" else (("by",) if n.op == "rank" else ()):
            name = a[fn_attr]
            if name and name != "logprob" and not has_function(name):
                raise VerifyError(f"{where}: {fn_attr}={name!r} is not a registered program function; register it "
                                  "with lmforge.programs.register_function first")
    return graph


def step_vocab(step: Graph) -> int | None:
    """The vocabulary of a decode step (its logits' last dim), when the graph states it."""
    v = step.outputs[0].type.shape[-1] if step.outputs else None
    return v if isinstance(v, int) else None


def _check_reader_vocab(graph: Graph, node, where: str) -> None:
    """A scoring or fuser model reads the candidates: its vocabulary must cover the tokens of every generate node
    upstream of them (both vocabularies known)."""
    vocab = step_vocab(node.regions[0])
    if vocab is None:
        return
    producers, seen = graph.producers(), set()
    todo = [v for v in node.inputs if v is not None and v.type.rank == 3]
    while todo:
        src = producers.get(todo.pop().name)
        if src is None or id(src) in seen:
            continue
        seen.add(id(src))
        if src.op != "generate":
            todo += [v for v in src.inputs if v is not None and v.type.rank == 3]
            continue
        gen_vocab = step_vocab(src.regions[0]) if src.regions else None
        if gen_vocab is not None and gen_vocab > vocab:
            raise VerifyError(f"{where}: its model's vocabulary ({vocab} tokens) is smaller than that of model "
                              f"{src.attr['model']!r} ({gen_vocab}), whose candidates it reads: the candidates' ids "
                              "must be its tokens; use a model with the generators' tokenizer")


def _check_generate(a, where, strategies, aggregators, has_function) -> None:
    s = a["strategy"]
    if s not in strategies:
        raise VerifyError(f"{where}: unknown strategy {s!r}; choose one of {strategies}")
    if a["max_new_tokens"] < 1:
        raise VerifyError(f"{where}: max_new_tokens must be >= 1")
    if s in ("sample", "best_of_n", "first_finish") and a["n"] < 1:
        raise VerifyError(f"{where}: n must be >= 1 samples")
    if s in ("beam", "diverse_beam", "trie_beam") and a["width"] < 1:
        raise VerifyError(f"{where}: beam width must be >= 1")
    if s == "diverse_beam" and (a["groups"] < 1 or a["width"] % a["groups"]):
        raise VerifyError(f"{where}: diverse beam width {a['width']} must be a multiple of groups {a['groups']}")
    if s == "best_of_n":
        if a["aggregator"] not in aggregators:
            raise VerifyError(f"{where}: aggregator {a['aggregator']!r} is not one of {aggregators}")
        if a["aggregator"] == "scorer" and not has_function(a["scorer"]):
            raise VerifyError(f"{where}: aggregator 'scorer' needs scorer=<a registered program function>, "
                              f"got {a['scorer']!r}")
    if s == "diverse_beam" and not a["diversity"] >= 0:
        raise VerifyError(f"{where}: diversity is the penalty on tokens earlier groups chose, >= 0 (0: plain beam "
                          f"search per group); got {a['diversity']}")
    if s == "momentum" and a["max_ngram"] < 2:
        raise VerifyError(f"{where}: momentum penalizes repeated n-grams of 2 <= n <= max_ngram tokens (a loop "
                          f"needs two), so max_ngram must be >= 2; got {a['max_ngram']}")
    if s == "momentum" and not (a["alpha"] >= 0 and a["resistance"] and all(r >= 0 for r in a["resistance"])):
        raise VerifyError(f"{where}: momentum subtracts alpha x resistance[c - 1] from a token that repeats an "
                          f"n-gram, so alpha >= 0 and a non-empty resistance table of values >= 0 (a negative one "
                          f"would reward loops); got alpha={a['alpha']}, resistance={tuple(a['resistance'])}")
    if s == "trie_beam":
        try:
            catalog_entries(a["catalog"])
        except LmforgeError as e:
            raise VerifyError(f"{where}: {e}") from None
    if s == "trie_beam" and not a["catalog"]:
        raise VerifyError(f"{where}: trie_beam needs a non-empty catalog of allowed token sequences")
    if s == "trie_beam" and a["eos_id"] < 0:
        short = [e for e in a["catalog"] if len(e) < a["max_new_tokens"]]
        if short:
            raise VerifyError(f"{where}: trie_beam without an eos_id cannot end catalog entries shorter than "
                              f"max_new_tokens={a['max_new_tokens']} (e.g. {tuple(short[0])}): give an eos_id, or "
                              "make every entry max_new_tokens long")
    if s == "first_finish" and a["eos_id"] < 0:
        raise VerifyError(f"{where}: first_finish needs eos_id (the first sample to emit it wins)")
    if s in ("sample", "best_of_n", "first_finish"):
        if not a["temperature"] > 0:
            raise VerifyError(f"{where}: sampling needs temperature > 0, got {a['temperature']} (for the most "
                              "likely tokens use strategy='greedy')")
        if not 0.0 < a["top_p"] <= 1.0:
            raise VerifyError(f"{where}: top_p is the nucleus' probability mass, in (0, 1]; got {a['top_p']}")


def _check_token_ids(a, where: str, step) -> None:
    """eos_id and a trie catalog's ids must be tokens of the model's vocabulary (its step's logits width)."""
    vocab = step_vocab(step) if step is not None else None
    if vocab is None:
        return
    if a["eos_id"] >= vocab:
        raise VerifyError(f"{where}: eos_id {a['eos_id']} is not a token of model {a['model']!r} (vocabulary of "
                          f"{vocab}); give the model's end-of-sequence id, or -1 for none")
    bad = sorted({t for entry in a["catalog"] for t in entry if not 0 <= t < vocab})
    if bad:
        raise VerifyError(f"{where}: catalog token ids {bad[:5]} are outside model {a['model']!r}'s vocabulary of "
                          f"{vocab}")
