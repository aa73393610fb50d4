"""Retrieval-augmented generation on the recall task: a program retrieves documents into the prompt, the trained
recall model reads them; lmforge measures accuracy, charges the cost on H100, and searches retriever x documents.

    python examples/rag_recall.py [--problems 64] [--budget 2.0]

World: 64 facts "key -> (a, b)", one per key, each a held-out triple of the recall task (the recall model never
saw any of them in training: a right answer comes from the retrieved text). The corpus is 16 documents of 4 facts
(`k a b k a b k a b k a b`, 12 tokens). A question is `BOS SEP q` ("what is q's value?"); the answer is `a b EOS`.
Without retrieval the model can only guess. With `retrieve(k, insert_at=1)` the prompt becomes
`BOS doc_1 ... doc_k SEP q`, the recall task's own format (k = 8: 32 pairs, the length it was trained on).

Retrievers: "overlap" (lexical: the document containing the key token wins) and dense retrievers "embed-E": a
fixed random E-dimensional vector per key token, a text embedded as the sum of its keys' vectors, scored by dot
product -- a weak encoder at small E, so the right document is often not first and more documents (longer
prompts, more prefill and KV reads) make up for it. The search (lmforge.programs.search) picks the retriever
and k that are most accurate under an eFLOPs budget, with the strategy fixed to greedy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import examples.models.llama  # noqa: F401
except ImportError:
    sys.modules.pop("examples", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.models.recall_task import (BOS, EOS, N_KEYS, N_VALUES, SEP, VOCAB_SIZE,  # noqa: E402
                                         is_held_out)
from lmforge.programs import register_corpus  # noqa: E402

FACTS_PER_DOC = 4
INSERT_AT = 1             # documents go after BOS
EMBED_DIMS = (4, 16, 64)


def make_world(seed: int = 0):
    """(documents [16, 12], questions [64, 3], answers [64, 3], gold document of each question [64])."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.arange(N_KEYS)
    values = torch.randint(N_KEYS, N_KEYS + N_VALUES, (N_KEYS, 2), generator=gen)
    redo = ~is_held_out(keys, values[:, 0], values[:, 1])
    while redo.any():                        # every fact is a held-out triple
        values[redo] = torch.randint(N_KEYS, N_KEYS + N_VALUES, (int(redo.sum()), 2), generator=gen)
        redo = ~is_held_out(keys, values[:, 0], values[:, 1])
    order = torch.randperm(N_KEYS, generator=gen).reshape(-1, FACTS_PER_DOC)       # the keys of each document
    documents = torch.cat([order[:, :, None], values[order]], 2).reshape(order.shape[0], -1)
    gold = torch.empty(N_KEYS, dtype=torch.long)
    gold[order.reshape(-1)] = torch.arange(order.shape[0]).repeat_interleave(FACTS_PER_DOC)
    questions = torch.stack([torch.full((N_KEYS,), BOS), torch.full((N_KEYS,), SEP), keys], 1)
    answers = torch.cat([values, torch.full((N_KEYS, 1), EOS)], 1)
    perm = torch.randperm(N_KEYS, generator=gen)                                   # question order
    return documents, questions[perm], answers[perm], gold[perm]


def key_encoder(dim: int, seed: int = 0):
    """embed(tokens [n, L]) -> [n, dim]: the sum of a fixed random vector per key token (other tokens: 0)."""
    table = torch.randn(VOCAB_SIZE, dim, generator=torch.Generator().manual_seed(1000 + seed))
    table[N_KEYS:] = 0.0

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        return table[tokens].sum(1)

    return embed


def register_retrievers(documents: torch.Tensor, dims=EMBED_DIMS) -> dict[str, tuple[str, str]]:
    """Register the corpus once per encoder; name -> (corpus, method) for ProgramEvaluator(retrievers=...)."""
    register_corpus("facts", documents)
    out = {"overlap": ("facts", "overlap")}
    for d in dims:
        register_corpus(f"facts-e{d}", documents, embed=key_encoder(d))
        out[f"embed-{d}"] = (f"facts-e{d}", "embedding")
    return out


def recall_at(k: int, questions, gold, corpus: str, method: str) -> float:
    """Fraction of questions whose gold document is among the k retrieved."""
    from lmforge.programs.retrieval import get_corpus, retrieve

    _, ids = retrieve(questions, get_corpus(corpus), k, method, INSERT_AT)
    return float((ids == gold[:, None]).any(1).float().mean())


def recall_step(prefill: bool = False):
    """The trained recall model's decode step (prefill=True: its prefill graph), captured for programs."""
    from examples.llama_workload import DECODE_DYNAMIC, PREFILL_DYNAMIC, decode_inputs
    from examples.models.llama import LlamaDecodeStep, LlamaPrefill
    from examples.models.recall_task import load_or_train, make_problems
    from lmforge.ir.frontends.torch_export import capture

    model = load_or_train()
    prompts, _ = make_problems(2, seed=0)
    if prefill:
        return capture(LlamaPrefill(model), (prompts,), dynamic=PREFILL_DYNAMIC)
    return capture(LlamaDecodeStep(model), decode_inputs(model, prompts, 5), dynamic=DECODE_DYNAMIC)


def main(argv=None) -> None:
    from lmforge.hwmodels import get_target
    from lmforge.programs.search import ProgramEvaluator, grid, grid_search, program_space, search

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--budget", type=float, default=2.0, help="eFLOPs budget in units of a k = 1 overlap run")
    ap.add_argument("--seed", type=int, default=0, help="the world's facts and documents")
    ap.add_argument("--seeds", type=int, default=3, help="search seeds")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--prefill", action="store_true", help="prefill prompts with the model's prefill graph")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    documents, questions, answers, gold = make_world(args.seed)
    questions, answers, gold = questions[:args.problems], answers[:args.problems], gold[:args.problems]
    retrievers = register_retrievers(documents)
    pre = {"prefills": {"recall": recall_step(prefill=True)}} if args.prefill else {}
    ev = ProgramEvaluator({"recall": recall_step()}, questions, answers, get_target("h100"), eos_id=EOS,
                          retrievers=retrievers, insert_at=INSERT_AT, **pre)
    base = {"program.model": "recall", "program.strategy": "greedy", "program.max_new_tokens": 3,
            "attn.decode_window": 0, "quant.kv": "none", "quant.weight_bits": 16}
    none = ev({**base, "program.retriever": "none"})
    print(f"no retrieval: accuracy {none.accuracy:.3f}, eFLOPs/prompt {none.eflops:.3e}")
    print(f"{'retriever':<10} {'k':>2} {'recall@k':>9} {'accuracy':>9} {'eFLOPs/prompt':>14} {'latency ms':>11}")
    for name, (corpus, method) in retrievers.items():
        for k in (1, 2, 4, 8):
            e = ev({**base, "program.retriever": name, "program.retrieve_k": k})
            print(f"{name:<10} {k:>2} {recall_at(k, questions, gold, corpus, method):>9.3f} {e.accuracy:>9.3f} "
                  f"{e.eflops:>14.3e} {e.latency_s * 1e3:>11.3f}")
    space = program_space(["recall"], max_new_choices=(3,), windows=(0,), kv=("none", "int8"),
                          strategies=("greedy",), weight_bits=(16, 8, 4), retrievers=tuple(retrievers))
    budget = args.budget * ev({**base, "program.retriever": "overlap", "program.retrieve_k": 1}).eflops
    g = grid_search(ev, space, budget_eflops=budget)
    print(f"grid: {len(grid(space))} configs x {len(questions)} problems; best under {budget:.3e} eFLOPs/prompt: "
          f"{describe(g.best)}")
    for seed in range(args.seeds):
        s = search(ev_fresh(ev), space, budget_eflops=budget, n_trials=args.trials, seed=seed)
        print(f"search seed {seed} ({args.trials} trials, {s.problems_evaluated / g.problems_evaluated:.0%} of the "
              f"grid's problem evaluations): {describe(s.best)}")


def describe(e) -> str:
    """One line on the best evaluation of a search, or on there being none (nothing fits the budget)."""
    if e is None:
        return "none: no config fits the budget (raise --budget: 1.0 is the cost of overlap with k = 1)"
    c = e.config
    rag = f"{c['program.retriever']} k={c['program.retrieve_k']}" if c["program.retriever"] != "none" else "none"
    return (f"{rag}, KV {c['quant.kv']}, {c['quant.weight_bits']}-bit weights: accuracy {e.accuracy:.3f}, "
            f"{e.eflops:.3e} eFLOPs/prompt")


def ev_fresh(ev):
    """A new evaluator (its own count of problem evaluations) sharing ev's generation cache and step variants."""
    from lmforge.programs.search import ProgramEvaluator

    out = ProgramEvaluator(ev.steps, ev.prompts, ev.answers, ev.hw, eos_id=ev.eos_id, retrievers=ev.retrievers,
                           insert_at=ev.insert_at, prefills=ev.prefills)
    out.cache, out._variants = ev.cache, ev._variants
    return out

if __name__ == "__main__":
    main()
