"""Run a program graph: node by node, prompt by prompt, with per-node token accounting and a generation cache.

    runner = ProgramRunner(program_graph)
    result = runner.run(prompts)            # prompts LongTensor [B, L], or a list of 1-D prompts of any lengths
    result.tokens[:, 0]                     # the program's answer per prompt, [B, T]
    result.accounts[i].generated_tokens     # what node i decoded

Each `generate` node's region (a decode-step graph) is compiled once (`lmforge.compiler.build_callable`).
The prompts of a run decode together: the rows of every prompt (its samples, beams) form one batch, so a run
costs one step call per token whatever the number of prompts (`batch_prompts=False`: one prompt at a time;
the outputs, traces and token accounting are the same). Each prompt is prefilled once and its KV cache
expanded to its rows (shared_prefix=True), and decode steps then run the step graph rewritten by the Hydragen
pass (`lmforge.passes.sparsity.shared_prefix_decode`), which reads each prompt's prefix once for its rows
(prefix groups of equal size; where sample caching leaves prompts with different row counts, the plain step
runs, with the same outputs). The generative fuser (fuse by="model") batches the prompts whose fuser inputs have
one length; rank / verify with a scoring model score every candidate of every prompt as one batch.

Samples are cached by (model, prompt, seed, sample index, and the sampling parameters): a best-of-8 after a
best-of-4 on the same prompts decodes only samples 4..7. Token accounting is derived from what each
generation decoded (its `DecodeTrace`), so a cached generation is charged exactly like a fresh one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node
from lmforge.programs import compound
from lmforge.programs.decoding import (DecodeTrace, Generation, StepModel, beam_search_many, greedy_many,
                                       momentum_many, sample_many)

SAMPLED = ("sample", "best_of_n", "first_finish")


@dataclass
class NodeAccount:
    """Token accounting of one program node over all prompts of a run (KV convention: lmforge.programs.cost)."""

    index: int
    op: str
    traces: list[DecodeTrace] = field(default_factory=list)
    checks: int = 0  # candidates a checker function looked at
    query_lens: list[int] = field(default_factory=list)  # retrieve: the length of each prompt scored

    @property
    def queries(self) -> int:
        """retrieve: prompts scored against the corpus."""
        return len(self.query_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prefill_rows * t.prompt_len for t in self.traces)

    @property
    def generated_tokens(self) -> int:
        return sum(sum(t.rows_per_step) for t in self.traces)


@dataclass
class ProgramResult:
    tokens: torch.Tensor   # [B, k, T]
    scores: torch.Tensor   # [B, k]
    accounts: list[NodeAccount]
    n_prompts: int


class GenerationCache:
    """In-memory cache of single samples and of deterministic generations (greedy, beam), keyed by value."""

    def __init__(self):
        self.entries: dict[tuple, Any] = {}
        self.hits = self.misses = 0

    def get(self, key):
        got = self.entries.get(key)
        self.hits += got is not None
        self.misses += got is None
        return got

    def put(self, key, value) -> None:
        self.entries[key] = value


class ExecContext:
    """What executing a node needs besides its inputs: the step models of its regions and the cache."""

    def __init__(self, step_models, cache: GenerationCache | None = None, model_keys=None, vocabs=None):
        self._step_models = step_models          # (node index, region index, prefix_len|None) -> StepModel
        self.cache = cache
        self.model_keys = model_keys or {}
        self.vocabs = vocabs or {}               # node index -> its model's vocabulary size

    def step_model(self, idx: int, region: int, prefix_len: int | None) -> StepModel:
        return self._step_models(idx, region, prefix_len)

    def vocab(self, idx: int) -> int | None:
        """The vocabulary size of node idx's model, when its step graph states it (None otherwise)."""
        return self.vocabs.get(idx)


def run_generate(ctx: ExecContext, idx: int, a: dict, prompts: torch.Tensor,
                 scorer_prompts: torch.Tensor | None = None) -> list[Generation]:
    """The prompts [B, L] through a generate node (attrs `a`, see lmforge.ir.ops.program_ops), as one batch:
    what the cache holds is reused, prompts that repeat decode once. scorer_prompts [B, L']: what a best-of-N
    scorer reads instead of `prompts` (the program's own prompts, when `prompts` are retrieval-augmented)."""
    strategy, T, eos, shared = a["strategy"], a["max_new_tokens"], a["eos_id"], a["shared_prefix"]
    model = ctx.step_model(idx, 0, prompts.shape[1] if shared else None)
    vocab = ctx.vocab(idx)
    bad = ids_outside(prompts, vocab)
    if bad:
        raise LmforgeError(f"prompt token ids {bad} are outside model {a['model']!r}'s vocabulary "
                           f"(0..{vocab - 1 if vocab is not None else '?'}); check the prompts (and the documents of "
                           "a retrieval corpus) against the model's tokenizer")
    keys = [(ctx.model_keys.get(idx, idx), tuple(p.tolist()), T, eos, shared) for p in prompts]
    if strategy in SAMPLED:
        gens = _cached_samples(ctx, [k + (a["seed"], a["temperature"], a["top_p"]) for k in keys], model, prompts,
                               a)
        if strategy == "sample":
            return gens
        if strategy == "first_finish":
            return [_first_finish(g) for g in gens]
        out = []
        for prompt, gen in zip(prompts if scorer_prompts is None else scorer_prompts, gens):
            tokens, scores = compound.aggregate(prompt, gen.tokens, gen.logprobs, a["aggregator"], a["scorer"])
            chosen = int((gen.tokens == tokens).all(1).int().argmax())   # the chosen sample (its tokens, its length)
            out.append(Generation(tokens, scores, gen.lengths[chosen:chosen + 1], gen.trace))
        return out
    if strategy not in ("greedy", "momentum", "beam", "diverse_beam", "trie_beam"):
        raise LmforgeError(f"generate: unknown strategy {strategy!r}")
    det = [k + (strategy, a["width"], a["groups"], a["diversity"], a["catalog"], a["alpha"], a["max_ngram"],
                a["resistance"]) for k in keys]
    found = {k: ctx.cache.get(k) if ctx.cache is not None else None for k in det}
    todo = [k for k, got in found.items() if got is None]
    if todo:
        batch = prompts[_first_rows(det, todo)]
        if strategy == "greedy":
            gens = greedy_many(model, batch, T, eos, shared)
        elif strategy == "momentum":
            gens = momentum_many(model, batch, T, eos, a["alpha"], a["max_ngram"], a["resistance"], shared)
        else:
            groups = a["groups"] if strategy == "diverse_beam" else 1
            catalog = a["catalog"] if strategy == "trie_beam" else None
            gens = beam_search_many(model, batch, T, eos, a["width"], groups, a["diversity"], catalog, shared)
        for k, got in zip(todo, gens):
            found[k] = got
            if ctx.cache is not None:
                ctx.cache.put(k, got)
    return [found[k] for k in det]


def _first_rows(keys: list, wanted) -> list[int]:
    """For each wanted key, the first row of the batch with that key (a prompt that repeats decodes once)."""
    first: dict = {}
    for b, k in enumerate(keys):
        first.setdefault(k, b)
    return [first[k] for k in wanted]


def _cached_samples(ctx, keys: list, model, prompts, a) -> list[Generation]:
    """Samples 0..n-1 of each prompt, decoding (as one batch) only those not cached; each prompt's trace is that
    of its n samples as one batch."""
    n = a["n"]
    rows = {k: [ctx.cache.get(k + (i,)) if ctx.cache is not None else None for i in range(n)] for k in keys}
    todo = {k: [i for i in range(n) if r[i] is None] for k, r in rows.items()}
    todo = {k: idx for k, idx in todo.items() if idx}
    if todo:
        gens = sample_many(model, prompts[_first_rows(keys, todo)], list(todo.values()), a["max_new_tokens"],
                           a["eos_id"], a["temperature"], a["top_p"], a["seed"], a["shared_prefix"])
        for (k, idx), g in zip(todo.items(), gens):
            for j, i in enumerate(idx):
                rows[k][i] = (g.tokens[j], g.logprobs[j], g.lengths[j])
                if ctx.cache is not None:
                    ctx.cache.put(k + (i,), rows[k][i])
    out = []
    for prompt, k in zip(prompts, keys):
        tokens = torch.stack([r[0] for r in rows[k]])
        lengths = torch.stack([r[2] for r in rows[k]])
        trace = DecodeTrace(len(prompt), 1 if a["shared_prefix"] else n,
                            [int((lengths > t).sum()) for t in range(int(lengths.max()))], a["shared_prefix"])
        out.append(Generation(tokens, torch.stack([r[1] for r in rows[k]]), lengths, trace))
    return out


def _first_finish(gen: Generation) -> Generation:
    """The sample that reaches EOS first (ties: higher log-probability, then lower index); decoding of all n
    stops there, so the trace has n rows for that many steps."""
    order = sorted(range(gen.tokens.shape[0]),
                   key=lambda i: (int(gen.lengths[i]), -float(gen.logprobs[i]), i))
    w = order[0]
    first = int(gen.lengths[w])
    trace = DecodeTrace(gen.trace.prompt_len, gen.trace.prefill_rows, [gen.tokens.shape[0]] * first,
                        gen.trace.shared_prefix)
    return Generation(gen.tokens[w:w + 1], gen.logprobs[w:w + 1], gen.lengths[w:w + 1], trace)


def model_score_fns(model: StepModel, prompts, tokens, traces: list, eos: int = -1) -> list:
    """One score_fn(prompt, tokens [j, T], mean=False) per prompt of prompts [B, L]: the summed log-probability of
    each row under `model` (teacher forced) up to and including its first `eos` (the EOS padding after it is not
    scored; eos -1: all T tokens), or with mean=True that sum over the row's length. All B x k candidates of
    tokens [B, k, T] are scored up front as one batch; each call then looks its rows up and records the trace a
    separate scoring call would have (prefill once; at step t the rows still before their EOS), so rank and
    verify (early exit) are charged for what they ask, as before batching."""
    B, k, T = tokens.shape
    logits, kc, vc = model.prefill_many(prompts, [k] * B, True)
    flat = tokens.reshape(B * k, T)
    lengths = torch.full((B * k,), T, dtype=torch.long)
    if eos >= 0:
        is_eos = flat == eos
        lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, lengths)
    total = torch.zeros(B * k)
    for t in range(T):
        step = logits.log_softmax(-1).gather(1, flat[:, t:t + 1]).squeeze(1)
        total += torch.where(lengths > t, step, torch.zeros_like(step))
        if t + 1 < int(lengths.max()):
            logits, kc, vc = model.run(flat[:, t], kc, vc)
        else:
            break
    total, lengths = total.reshape(B, k), lengths.reshape(B, k)

    def score_fn(b):
        table = {tuple(row): (total[b, i], int(lengths[b, i])) for i, row in enumerate(tokens[b].tolist())}

        def score(prompt, cands, mean: bool = False):
            got = [table[tuple(row)] for row in cands.tolist()]
            longest = max(n for _, n in got)
            traces.append(DecodeTrace(len(prompt), 1, [sum(n > t for _, n in got) for t in range(longest)], True))
            return torch.stack([s / n if mean else s for s, n in got])

        return score

    return [score_fn(b) for b in range(B)]


def run_node(ctx: ExecContext, idx: int, node: Node, args: list, account: NodeAccount | None = None,
             batch_prompts: bool = True):
    """Execute a program node on batched inputs (prompts [B, L], candidates [B, k, T], scores [B, k]).
    batch_prompts=False runs the prompts one at a time (same results)."""
    if not batch_prompts and args[0].shape[0] > 1:
        parts = [run_node(ctx, idx, node, [x[b:b + 1] for x in args], account) for b in range(args[0].shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    a = node.attr
    traces = account.traces if account is not None else []
    if node.op == "retrieve":
        if account is not None:
            account.query_lens += [args[0].shape[1]] * args[0].shape[0]
        return run_retrieve(a, args[0])
    if node.op == "generate":
        gens = run_generate(ctx, idx, a, *args)
        traces.extend(g.trace for g in gens)
        return torch.stack([g.tokens for g in gens]), torch.stack([g.logprobs.float() for g in gens])
    if node.op == "fuse" and a["by"] == "model":
        return run_fuser(ctx, idx, node, *args, traces)
    outs_t, outs_s = [], []
    score_fns = [None] * args[0].shape[0]
    if node.regions and node.op in ("rank", "verify"):  # a scoring model: all candidates scored as one batch
        bad = ids_outside(args[1], ctx.vocab(idx))
        if bad:
            raise LmforgeError(f"{node.op}: candidate token ids {bad} are outside the scoring model's vocabulary "
                               f"(0..{ctx.vocab(idx) - 1}); score with a model whose vocabulary covers the "
                               "generators' (the same tokenizer)")
        score_fns = model_score_fns(ctx.step_model(idx, 0, None), args[0], args[1], traces, a["eos_id"])
    for b in range(args[0].shape[0]):
        tokens, scores, checks = _compound_row(node, a, [x[b] for x in args], score_fns[b])
        if account is not None:
            account.checks += checks
        outs_t.append(tokens)
        outs_s.append(scores.float())
    return torch.stack(outs_t), torch.stack(outs_s)


def ids_outside(tokens: torch.Tensor, vocab: int | None) -> list[int]:
    """The first few distinct ids of `tokens` that are not tokens of a vocabulary of `vocab` ids (negative ones
    only, when the vocabulary is unknown); [] when all are."""
    if not tokens.numel() or (int(tokens.min()) >= 0 and (vocab is None or int(tokens.max()) < vocab)):
        return []
    bad = (tokens < 0) | (tokens >= vocab) if vocab is not None else tokens < 0
    return sorted(set(tokens[bad].tolist()))[:5]


def run_retrieve(a: dict, prompts: torch.Tensor):
    """retrieve: the k best documents of the registered corpus in each prompt (lmforge.programs.retrieval)."""
    from lmforge.programs.retrieval import get_corpus, retrieve

    corpus = get_corpus(a["corpus"])
    if (corpus.n_docs, corpus.doc_len, corpus.embed_dim) != (a["n_docs"], a["doc_len"], a["embed_dim"]):
        raise LmforgeError(f"retrieve: corpus {a['corpus']!r} is now {corpus.n_docs} documents of {corpus.doc_len} "
                           f"tokens (embedding width {corpus.embed_dim}); the program was built for {a['n_docs']} of "
                           f"{a['doc_len']} (width {a['embed_dim']}): rebuild the program")
    if a.get("fingerprint") and a["fingerprint"] != corpus.fingerprint:
        raise LmforgeError(f"retrieve: the corpus registered as {a['corpus']!r} (fingerprint {corpus.fingerprint}) "
                           f"differs from the one the program was built and tuned with (fingerprint "
                           f"{a['fingerprint']}): its documents, its pad_id or its embedding width changed. Register "
                           f"the same corpus (documents, encoder, pad_id) as {a['corpus']!r}, or rebuild the program "
                           "(and re-tune it) for this corpus")
    return retrieve(prompts, corpus, a["k"], a["method"], a["insert_at"])


def run_fuser(ctx: ExecContext, idx: int, node: Node, prompts, tokens, scores, traces):
    """fuse(by="model") on prompts [B, L] with candidates [B, k, T]: the fuser region (a decode step) reads prompt +
    candidates and decodes T tokens greedily (no EOS stop: the answer has the candidates' length); the prompts
    whose fuser inputs have one length decode as one batch. Its separator is the last id of its vocabulary. The
    fuser's generations are cached by (fuser, input tokens, T) and each trace (one row, prefill of the whole
    input, T steps) goes into the node's accounting like any model call."""
    model = ctx.step_model(idx, 0, None)
    sep = vocab_size(model, node.regions[0]) - 1
    if int(tokens.max()) >= sep:
        raise LmforgeError(f"fuse(by='model'): candidate token {int(tokens.max())} is not in the fuser's task "
                           f"vocabulary (ids < {sep}; {sep} is its separator)")
    T = tokens.shape[2]
    inputs = {b: compound.fuser_input(prompts[b], tokens[b], scores[b], sep) for b in range(prompts.shape[0])
              if torch.isfinite(scores[b]).any()}
    keys = {b: ("fuse", ctx.model_keys.get(idx, idx), tuple(inp.tolist()), T) for b, inp in inputs.items()}
    gens = {k: ctx.cache.get(k) if ctx.cache is not None else None for k in keys.values()}
    by_length: dict[int, dict[tuple, torch.Tensor]] = {}
    for b, k in keys.items():
        if gens[k] is None:
            by_length.setdefault(len(inputs[b]), {})[k] = inputs[b]
    for same in by_length.values():
        for k, got in zip(same, greedy_many(model, torch.stack(list(same.values())), T, -1, shared_prefix=False)):
            gens[k] = got
            if ctx.cache is not None:
                ctx.cache.put(k, got)
    out_t, out_s = [], []
    for b in range(prompts.shape[0]):
        t, sc, gen = compound.fuse_by_model(prompts[b], tokens[b], scores[b], sep,
                                            lambda inp, n, key=keys.get(b): gens[key])
        if gen is not None:
            traces.append(gen.trace)
        out_t.append(t)
        out_s.append(sc.float())
    return torch.stack(out_t), torch.stack(out_s)


def vocab_size(model: StepModel, region) -> int:
    """The vocabulary of a decode step: from its graph's logits type, or (a compiled region) by one probe step."""
    if isinstance(region, Graph):
        return int(region.outputs[0].type.shape[-1])
    k, v = model.empty(1)
    return int(model.run(torch.zeros(1, dtype=torch.long), k, v)[0].shape[-1])


def _compound_row(node, a, row, score_fn):
    if node.op == "fuse":
        return (*compound.fuse(*row), 0)
    if node.op == "ensemble":
        return (*compound.ensemble(list(zip(row[0::2], row[1::2]))), 0)
    if node.op == "vote":
        return (*compound.vote(row[0], row[1]), 0)
    prompt, tokens, scores = row
    if node.op == "rank":
        by = "model" if node.regions else a["by"]
        t, s = compound.rank(prompt, tokens, scores, by, a["top_k"], score_fn)
        return t, s, tokens.shape[0] if by not in ("logprob", "model") else 0
    if node.op == "verify":
        return compound.verify(prompt, tokens, scores, a["checker"], a["first_k"], a["threshold"], score_fn)
    raise LmforgeError(f"{node.op!r} is not a program op this runtime knows")


class ProgramRunner:
    """Runs a program graph (see the module docstring). hydragen=False keeps prefill-once but decodes with
    the plain step graph; the outputs are the same."""

    def __init__(self, graph: Graph, *, hydragen: bool = True, cache: GenerationCache | None = None,
                 threads: int | None = 1, batch_prompts: bool = True):
        from lmforge.ir.verify import verify
        from lmforge.programs.builder import step_vocab, verify_program

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise LmforgeError(f"threads is the number of CPU threads torch uses while the program runs: an int >= 1, "
                               f"or None to keep torch's setting; got {threads!r}")
        self.graph = verify_program(verify(graph))
        self.hydragen = hydragen
        self.batch_prompts = batch_prompts
        self.threads = threads  # per-prompt batches are tiny: one thread avoids thread-pool stalls on a busy CPU
        self.cache = cache if cache is not None else GenerationCache()
        self._compiled: dict[int, Any] = {}
        self._models: dict[tuple, StepModel] = {}
        keys = {i: (n.attr.get("model", ""), *(r.signature() for r in n.regions),
                    *(weights_fingerprint(r, graph.weights) for r in n.regions))
                for i, n in enumerate(graph.nodes) if n.regions}
        vocabs = {i: step_vocab(n.regions[0]) for i, n in enumerate(graph.nodes)
                  if n.regions and step_vocab(n.regions[0]) is not None}
        self.ctx = ExecContext(self.step_model, self.cache, keys, vocabs)

    def _compile(self, region: Graph):
        from lmforge.backends import default_backends
        from lmforge.compiler import region_callable

        if id(region) not in self._compiled:
            self._compiled[id(region)] = (region, region_callable(region, default_backends(("torch",)), "cpu",
                                                                  self.graph.weights))
        return self._compiled[id(region)][1]

    def step_model(self, idx: int, region: int, prefix_len: int | None) -> StepModel:
        from lmforge.ir.types import torch_dtype
        from lmforge.programs.builder import kv_dtype_of, kv_shape_of

        key = (idx, region, prefix_len if self.hydragen else None)
        if key not in self._models:
            r = self.graph.nodes[idx].regions[region]
            hyd = hydragen_region(r, prefix_len) if (self.hydragen and prefix_len) else None

            def grouped(rows_per_prefix: int, r=r, prefix_len=prefix_len):
                g = hydragen_region(r, prefix_len, rows_per_prefix) if (self.hydragen and prefix_len) else None
                return self._compile(g) if g is not None else None

            regions = self.graph.nodes[idx].regions
            pre = regions[region + 1] if len(regions) > region + 1 else None   # the model's prefill graph
            self._models[key] = StepModel(self._compile(r), kv_shape_of(r), torch_dtype(kv_dtype_of(r)),
                                          hydragen_step=self._compile(hyd) if hyd is not None else None,
                                          grouped=grouped, prefill_fn=self._compile(pre) if pre is not None else None)
        return self._models[key]

    @torch.no_grad()
    def run(self, prompts) -> ProgramResult:
        """Run the program on prompts: a LongTensor [batch, prompt_len], or a list of 1-D LongTensors of any
        lengths (prompts of one length run as one batch; results come back in the list's order)."""
        if isinstance(prompts, (list, tuple)):
            return self._run_lengths(prompts)
        if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.dtype != torch.long or \
                0 in prompts.shape:
            got = f"{prompts.dtype} {tuple(prompts.shape)}" if isinstance(prompts, torch.Tensor) else type(prompts)
            raise LmforgeError(f"a program takes prompts as a LongTensor [batch, prompt_len] (at least one prompt of "
                               f"at least one token) or a list of 1-D LongTensors, got {got}")
        declared = self.graph.inputs[0].type.shape[1]
        if isinstance(declared, int) and prompts.shape[1] != declared:
            raise LmforgeError(f"program {self.graph.name!r} was built for prompts of {declared} tokens "
                               f"(prompt_len={declared}), got {tuple(prompts.shape)}; build it with the default "
                               "prompt_len='prompt_len' to run prompts of any length")
        env = {self.graph.inputs[0].name: prompts}
        accounts = []
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            for i, node in enumerate(self.graph.nodes):
                account = NodeAccount(i, node.op)
                outs = run_node(self.ctx, i, node, [env[v.name] for v in node.inputs], account, self.batch_prompts)
                env.update({v.name: x for v, x in zip(node.outputs, outs)})
                accounts.append(account)
        finally:
            torch.set_num_threads(before)
        tok, sc = (env[v.name] for v in self.graph.outputs)
        return ProgramResult(tok, sc, accounts, prompts.shape[0])

    def _run_lengths(self, prompts) -> ProgramResult:
        """Prompts of different lengths: one batched run per length; outputs in the list's order, each node's
        accounting merged over the runs (its traces grouped by prompt length)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.dtype != torch.long or p.numel() == 0:
                got = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
                raise LmforgeError(f"prompt {i} of the list is {got}: each prompt must be a non-empty 1-D "
                                   f"LongTensor of token ids")
            groups.setdefault(p.numel(), []).append(i)
        if not groups:
            raise LmforgeError("no prompts to run: pass at least one prompt")
        runs = [(rows, self.run(torch.stack([prompts[i] for i in rows]))) for rows in groups.values()]
        first = runs[0][1]
        tokens = first.tokens.new_empty((len(prompts), *first.tokens.shape[1:]))
        scores = first.scores.new_empty((len(prompts), *first.scores.shape[1:]))
        for rows, r in runs:
            tokens[rows], scores[rows] = r.tokens, r.scores
        accounts = [NodeAccount(a.index, a.op) for a in first.accounts]
        for _, r in runs:
            for merged, a in zip(accounts, r.accounts):
                merged.traces += a.traces
                merged.checks += a.checks
                merged.query_lens += a.query_lens
        return ProgramResult(tokens, scores, accounts, len(prompts))


def weights_fingerprint(region: Graph, weights) -> str:
    """A digest of the weights a region reads (each parameter's name, shape, dtype, sum and a strided sample of
    its values), so that the generation cache tells two models of one structure apart (another checkpoint of the
    same architecture under the same name): generations are cached by model, not only by graph structure."""
    h = hashlib.sha1()
    for p in region.params:
        w = weights.get(p.name, region.weights.get(p.name))
        h.update(f"{p.name}:{p.type}".encode())
        if isinstance(w, torch.Tensor):
            h.update(_tensor_digest(w))
    return h.hexdigest()[:16]


# (id, data pointer, version, shape) -> (weak reference to the tensor, digest): a search makes a runner per config
# over the same weights; the weak reference makes sure the id is still that tensor's
_DIGESTS: dict[tuple, tuple] = {}


def _tensor_digest(w: torch.Tensor) -> bytes:
    import weakref

    key = (id(w), w.data_ptr(), w._version, tuple(w.shape))
    got = _DIGESTS.get(key)
    if got is None or got[0]() is not w:
        if len(_DIGESTS) > 4096:
            _DIGESTS.clear()
        bits = _raw_bits(w.detach())
        digest = hashlib.sha1(bits[::max(1, bits.numel() // 4096)].cpu().numpy().tobytes()
                              + str(_bit_sum(bits)).encode()).digest()
        got = _DIGESTS[key] = (weakref.ref(w), digest)
    return got[1]


def _raw_bits(w: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat integer tensor of their bit patterns (same element size)."""
    flat = w.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])


def _bit_sum(bits: torch.Tensor, chunk: int = 1 << 24) -> int:
    """The sum of the bit patterns in int64 (wrapping): exact, so the same on any device and thread count (a float
    sum is not: its order of additions changes with both); summed in chunks to bound the int64 copy."""
    total = 0
    for start in range(0, bits.numel(), chunk):
        total = (total + int(bits[start:start + chunk].to(torch.int64).sum())) % (1 << 64)
    return total


_HYDRAGEN: dict[tuple, tuple[Graph, Graph | None]] = {}  # (id(step), P, r) -> (step, rewritten): ids are rechecked


def hydragen_region(step: Graph, prefix_len: int, rows_per_prefix: int | None = None) -> Graph | None:
    """The step graph after the Hydragen rewrite for a shared prefix of prefix_len entries (rows_per_prefix: see
    `shared_prefix_decode`), or None when it has no plain decode attention to rewrite (e.g. after a
    sparse-attention or KV-quantization pass)."""
    from lmforge.passes.sparsity import shared_prefix_decode

    key = (id(step), prefix_len, rows_per_prefix)
    if key not in _HYDRAGEN or _HYDRAGEN[key][0] is not step:
        if len(_HYDRAGEN) > 256:
            _HYDRAGEN.clear()
        out = shared_prefix_decode(step, prefix_len, rows_per_prefix)
        _HYDRAGEN[key] = (step, out if any(n.op == "shared_prefix_attention" for n in out.nodes) else None)
    return _HYDRAGEN[key][1]
