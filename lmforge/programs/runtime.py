"""Run a program graph: node by node, prompt by prompt, with per-node token accounting and a generation cache.

    runner = ProgramRunner(program_graph)
    result = runner.run(prompts)            # prompts LongTensor [B, L]
    result.tokens[:, 0]                     # the program's answer per prompt, [B, T]
    result.accounts[i].generated_tokens     # what node i decoded

Each `generate` node's region (a decode-step graph) is compiled once (`lmforge.compiler.build_callable`).
The samples of one prompt run as one batch; the prompt is prefilled once and its KV cache expanded to the
samples (shared_prefix=True), and decode steps then run the step graph rewritten by the Hydragen pass
(`lmforge.passes.sparsity.shared_prefix_decode`), which reads the shared prefix once for all rows.

Samples are cached by (model, prompt, seed, sample index, and the sampling parameters): a best-of-8 after a
best-of-4 on the same prompts decodes only samples 4..7. Token accounting is derived from what each
generation decoded (its `DecodeTrace`), so a cached generation is charged exactly like a fresh one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node
from lmforge.programs import compound
from lmforge.programs.decoding import (DecodeTrace, Generation, StepModel, beam_search, greedy, momentum, sample)

SAMPLED = ("sample", "best_of_n", "first_finish")


@dataclass
class NodeAccount:
    """Token accounting of one program node over all prompts of a run (KV convention: lmforge.programs.cost)."""

    index: int
    op: str
    traces: list[DecodeTrace] = field(default_factory=list)
    checks: int = 0  # candidates a checker function looked at

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

    def __init__(self, step_models, cache: GenerationCache | None = None, model_keys=None):
        self._step_models = step_models          # (node index, region index, prefix_len|None) -> StepModel
        self.cache = cache
        self.model_keys = model_keys or {}

    def step_model(self, idx: int, region: int, prefix_len: int | None) -> StepModel:
        return self._step_models(idx, region, prefix_len)


def run_generate(ctx: ExecContext, idx: int, a: dict, prompt: torch.Tensor) -> Generation:
    """One prompt through a generate node (attrs `a`, see lmforge.ir.ops.program_ops)."""
    strategy, T, eos, shared = a["strategy"], a["max_new_tokens"], a["eos_id"], a["shared_prefix"]
    model = ctx.step_model(idx, 0, len(prompt) if shared else None)
    key = (ctx.model_keys.get(idx, idx), tuple(prompt.tolist()), T, eos, shared)
    if strategy in SAMPLED:
        n = a["n"]
        gen = _cached_samples(ctx, key + (a["seed"], a["temperature"], a["top_p"]), model, prompt, n, a)
        if strategy == "sample":
            return gen
        if strategy == "first_finish":
            return _first_finish(gen)
        tokens, scores = compound.aggregate(prompt, gen.tokens, gen.logprobs, a["aggregator"], a["scorer"])
        return Generation(tokens, scores, gen.lengths[:1], gen.trace)
    det_key = key + (strategy, a["width"], a["groups"], a["diversity"], a["catalog"], a["alpha"], a["max_ngram"],
                     a["resistance"])
    got = ctx.cache.get(det_key) if ctx.cache is not None else None
    if got is None:
        if strategy == "greedy":
            got = greedy(model, prompt, T, eos, shared)
        elif strategy == "momentum":
            got = momentum(model, prompt, T, eos, a["alpha"], a["max_ngram"], a["resistance"], shared)
        elif strategy in ("beam", "diverse_beam", "trie_beam"):
            groups = a["groups"] if strategy == "diverse_beam" else 1
            catalog = a["catalog"] if strategy == "trie_beam" else None
            got = beam_search(model, prompt, T, eos, a["width"], groups, a["diversity"], catalog, shared)
        else:
            raise LmforgeError(f"generate: unknown strategy {strategy!r}")
        if ctx.cache is not None:
            ctx.cache.put(det_key, got)
    return got


def _cached_samples(ctx, key, model, prompt, n, a) -> Generation:
    """Samples 0..n-1 of the prompt, decoding only those not cached; the trace is that of all n as one batch."""
    rows: list = [ctx.cache.get(key + (i,)) if ctx.cache is not None else None for i in range(n)]
    todo = [i for i in range(n) if rows[i] is None]
    if todo:
        g = sample(model, prompt, todo, a["max_new_tokens"], a["eos_id"], a["temperature"], a["top_p"], a["seed"],
                   a["shared_prefix"])
        for j, i in enumerate(todo):
            rows[i] = (g.tokens[j], g.logprobs[j], g.lengths[j])
            if ctx.cache is not None:
                ctx.cache.put(key + (i,), rows[i])
    tokens = torch.stack([r[0] for r in rows])
    lengths = torch.stack([r[2] for r in rows])
    steps = int(lengths.max())
    trace = DecodeTrace(len(prompt), 1 if a["shared_prefix"] else n,
                        [int((lengths > t).sum()) for t in range(steps)], a["shared_prefix"])
    return Generation(tokens, torch.stack([r[1] for r in rows]), lengths, trace)


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


def model_score_fn(model: StepModel, traces: list):
    """score_fn(prompt, tokens [k, T]) -> summed log-probability of each row under `model` (teacher forced)."""

    def score(prompt, tokens):
        k, T = tokens.shape
        logits, kc, vc = model.prefill(prompt, k, True)
        total = torch.zeros(k)
        for t in range(T):
            total += logits.log_softmax(-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
            if t + 1 < T:
                logits, kc, vc = model.run(tokens[:, t], kc, vc, shared=True)
        traces.append(DecodeTrace(len(prompt), 1, [k] * T, True))
        return total

    return score


def run_node(ctx: ExecContext, idx: int, node: Node, args: list, account: NodeAccount | None = None):
    """Execute a program node on batched inputs (prompts [B, L], candidates [B, k, T], scores [B, k])."""
    a = node.attr
    traces = account.traces if account is not None else []
    outs_t, outs_s = [], []
    for b in range(args[0].shape[0]):
        row = [x[b] for x in args]
        if node.op == "generate":
            g = run_generate(ctx, idx, a, row[0])
            traces.append(g.trace)
            tokens, scores = g.tokens, g.logprobs
        else:
            tokens, scores, checks = _compound_row(ctx, idx, node, a, row, traces)
            if account is not None:
                account.checks += checks
        outs_t.append(tokens)
        outs_s.append(scores.float())
    return torch.stack(outs_t), torch.stack(outs_s)


def run_fuser(ctx: ExecContext, idx: int, node: Node, prompt, tokens, scores, traces):
    """fuse(by="model") on one prompt: the fuser region (a decode step) reads prompt + candidates and decodes
    T tokens greedily (no EOS stop: the answer has the candidates' length). Its separator is the last id of
    its vocabulary. The fuser's generation is cached by (fuser, input tokens, T) and its trace (one row,
    prefill of the whole input, T steps) goes into the node's accounting like any model call."""
    model = ctx.step_model(idx, 0, None)
    sep = vocab_size(model, node.regions[0]) - 1
    if int(tokens.max()) >= sep:
        raise LmforgeError(f"fuse(by='model'): candidate token {int(tokens.max())} is not in the fuser's task "
                           f"vocabulary (ids < {sep}; {sep} is its separator)")

    def run(inp, T):
        key = ("fuse", ctx.model_keys.get(idx, idx), tuple(inp.tolist()), T)
        got = ctx.cache.get(key) if ctx.cache is not None else None
        if got is None:
            got = greedy(model, inp, T, -1, shared_prefix=False)
            if ctx.cache is not None:
                ctx.cache.put(key, got)
        return got

    out_t, out_s, gen = compound.fuse_by_model(prompt, tokens, scores, sep, run)
    if gen is not None:
        traces.append(gen.trace)
    return out_t, out_s, 0


def vocab_size(model: StepModel, region) -> int:
    """The vocabulary of a decode step: from its graph's logits type, or (a compiled region) by one probe step."""
    if isinstance(region, Graph):
        return int(region.outputs[0].type.shape[-1])
    k, v = model.empty(1)
    return int(model.run(torch.zeros(1, dtype=torch.long), k, v)[0].shape[-1])


def _compound_row(ctx, idx, node, a, row, traces):
    if node.op == "fuse":
        prompt, tokens, scores = row
        if a["by"] == "model":
            return run_fuser(ctx, idx, node, prompt, tokens, scores, traces)
        return (*compound.fuse(prompt, tokens, scores), 0)
    score_fn = model_score_fn(ctx.step_model(idx, 0, None), traces) if node.regions else None
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
                 threads: int | None = 1):
        from lmforge.ir.verify import verify
        from lmforge.programs.builder import verify_program

        self.graph = verify_program(verify(graph))
        self.hydragen = hydragen
        self.threads = threads  # per-prompt batches are tiny: one thread avoids thread-pool stalls on a busy CPU
        self.cache = cache if cache is not None else GenerationCache()
        self._compiled: dict[int, Any] = {}
        self._models: dict[tuple, StepModel] = {}
        keys = {i: (n.attr.get("model", ""), n.regions[0].signature()) for i, n in enumerate(graph.nodes)
                if n.regions}
        self.ctx = ExecContext(self.step_model, self.cache, keys)

    def _compile(self, region: Graph):
        from lmforge.backends import default_backends
        from lmforge.compiler import build_callable

        if id(region) not in self._compiled:
            self._compiled[id(region)] = (region, build_callable(region, default_backends(("torch",)), "cpu",
                                                                 self.graph.weights)[0])
        return self._compiled[id(region)][1]

    def step_model(self, idx: int, region: int, prefix_len: int | None) -> StepModel:
        from lmforge.programs.builder import kv_shape_of

        key = (idx, region, prefix_len if self.hydragen else None)
        if key not in self._models:
            r = self.graph.nodes[idx].regions[region]
            hyd = hydragen_region(r, prefix_len) if (self.hydragen and prefix_len) else None
            self._models[key] = StepModel(self._compile(r), kv_shape_of(r),
                                          hydragen_step=self._compile(hyd) if hyd is not None else None)
        return self._models[key]

    @torch.no_grad()
    def run(self, prompts: torch.Tensor) -> ProgramResult:
        if prompts.dim() != 2 or prompts.dtype != torch.long:
            raise LmforgeError(f"a program takes prompts as a LongTensor [batch, prompt_len], got "
                               f"{prompts.dtype} {tuple(prompts.shape)}")
        env = {self.graph.inputs[0].name: prompts}
        accounts = []
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            for i, node in enumerate(self.graph.nodes):
                account = NodeAccount(i, node.op)
                outs = run_node(self.ctx, i, node, [env[v.name] for v in node.inputs], account)
                env.update({v.name: x for v, x in zip(node.outputs, outs)})
                accounts.append(account)
        finally:
            torch.set_num_threads(before)
        tok, sc = (env[v.name] for v in self.graph.outputs)
        return ProgramResult(tok, sc, accounts, prompts.shape[0])


_HYDRAGEN: dict[tuple, tuple[Graph, Graph | None]] = {}  # (id(step), P) -> (step, rewritten): ids are rechecked


def hydragen_region(step: Graph, prefix_len: int) -> Graph | None:
    """The step graph after the Hydragen rewrite for a shared prefix of prefix_len entries, or None when it
    has no plain decode attention to rewrite (e.g. after a sparse-attention or KV-quantization pass)."""
    from lmforge.passes.sparsity import shared_prefix_decode

    key = (id(step), prefix_len)
    if key not in _HYDRAGEN or _HYDRAGEN[key][0] is not step:
        if len(_HYDRAGEN) > 256:
            _HYDRAGEN.clear()
        out = shared_prefix_decode(step, prefix_len)
        _HYDRAGEN[key] = (step, out if any(n.op == "shared_prefix_attention" for n in out.nodes) else None)
    return _HYDRAGEN[key][1]
