"""What a user can get wrong with programs gets a clear LmforgeError (VerifyError at build time where the graph
already says so), not a traceback from inside torch or a silently wrong result; found by an audit of the API."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS
from lmforge.errors import LmforgeError, VerifyError
from lmforge.hwmodels import get_target
from lmforge.programs import GenerationCache, ProgramBuilder, ProgramRunner, program_cost, register_function

VOCAB = 14   # the tiny task model's vocabulary


def _gen(b, **attrs):
    return b.generate("tiny", **{"max_new_tokens": ANSWER_LEN, "eos_id": EOS, **attrs})


BUILD_ERRORS = [   # (build(b) -> candidates, the error's words)
    (lambda b: _gen(b, eos_id=VOCAB + 85), "eos_id 99 is not a token"),
    (lambda b: _gen(b, strategy="trie_beam", width=2, catalog=[(1, 99, EOS)]), "catalog token ids \\[99\\]"),
    (lambda b: _gen(b, strategy="sample", n=2, temperature=-1.0), "temperature > 0"),
    (lambda b: _gen(b, strategy="best_of_n", n=2, top_p=0.0), "top_p"),
    (lambda b: b.rank(_gen(b, strategy="sample", n=2), top_k=0), "top_k >= 1"),
    (lambda b: b.verify(_gen(b, strategy="sample", n=2), checker="addition_checker", first_k=-1), "first_k"),
    (lambda b: b.verify(_gen(b), model="tiny", threshold=0.0), "threshold"),
    (lambda b: b.verify(_gen(b), model="tiny", checker="addition_checker"), "not both"),
    (lambda b: b.rank(_gen(b, strategy="sample", n=2), by="addition_checker", model="tiny"), "not both"),
    (lambda b: _gen(b, strategy="diverse_beam", width=2, groups=2, diversity=-5.0), "diversity .* >= 0"),
    (lambda b: _gen(b, strategy="momentum", alpha=1.0, max_ngram=1), "max_ngram must be >= 2"),
    (lambda b: _gen(b, strategy="momentum", alpha=-1.0), "alpha >= 0"),
    (lambda b: _gen(b, strategy="momentum", alpha=1.0, resistance=()), "non-empty resistance"),
    (lambda b: _gen(b, strategy="momentum", alpha=1.0, resistance=(1.0, -2.0)), "would reward loops"),
    (lambda b: _gen(b, strategy="trie_beam", width=2, eos_id=-1, catalog=[(8, 3), (1, 2, 3, 4)]),
     r"without an eos_id .* \(e.g. \(8, 3\)\): give an eos_id"),
]


@pytest.mark.parametrize("build,match", BUILD_ERRORS)
def test_programs_that_cannot_run_are_refused_at_build_time(tiny, build, match):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    with pytest.raises(VerifyError, match=match):
        b.build(build(b))


@pytest.mark.parametrize("catalog", [[("a", "b")], [5, 6], "56", None, [(1.5, 2)], [(True, 2)], [[torch.tensor(1.0)]]])
def test_a_malformed_catalog_is_a_clear_error(tiny, catalog):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    with pytest.raises(LmforgeError, match="catalog must be a list of token-id sequences"):
        _gen(b, strategy="trie_beam", width=2, catalog=catalog)


def test_catalogs_take_ids_of_any_integer_kind_and_graphs_are_checked(tiny):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    graph = b.build(_gen(b, strategy="trie_beam", width=2, catalog=[torch.tensor([8, 3, EOS]), [1, 2, EOS]]))
    assert graph.nodes[0].attr["catalog"] == ((8, 3, EOS), (1, 2, EOS))
    from lmforge.programs import verify_program

    bad = graph.with_nodes([graph.nodes[0].with_attrs(catalog=((8, "x"),))])
    with pytest.raises(VerifyError, match="node 0 .*catalog must be a list of token-id sequences"):
        verify_program(bad)


def test_models_must_be_captured_graphs_and_prefills_dynamic(tiny):
    from examples.models.llama import LlamaPrefill
    from examples.models.tiny_task import make_problems
    from lmforge.ir.frontends.torch_export import capture

    with pytest.raises(LmforgeError, match="not a graph: capture its decode step"):
        ProgramBuilder("p", {"tiny": tiny[0]})
    static = capture(LlamaPrefill(tiny[0]), (make_problems(2, seed=0)[0],))          # no dynamic dims
    with pytest.raises(LmforgeError, match="dynamic batch and sequence dims"):
        ProgramBuilder("p", {"tiny": tiny[1]}, prefills={"tiny": static})


@pytest.mark.parametrize("prompts,match", [
    (torch.tensor([[1, 2, 99]]), r"prompt token ids \[99\] are outside"),
    (torch.tensor([[1, -3, 2]]), r"prompt token ids \[-3\]"),
    (torch.zeros(0, 6, dtype=torch.long), "at least one prompt"),
    (torch.zeros(3, 0, dtype=torch.long), "at least one prompt"),
])
def test_bad_prompts_at_run_time(tiny, prompts, match):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    with pytest.raises(LmforgeError, match=match):
        ProgramRunner(b.build(_gen(b))).run(prompts)


def test_compiled_programs_check_prompt_ids_like_the_runner(tiny):
    import lmforge

    b = ProgramBuilder("p", {"tiny": tiny[1]})
    compiled = lmforge.compile(b.build(_gen(b, strategy="beam", width=2)))
    with pytest.raises(LmforgeError, match=r"prompt token ids \[99\] are outside model 'tiny''s vocabulary"):
        compiled(torch.tensor([[1, 2, 99]]))


@pytest.mark.parametrize("threads", [-1, 0, 1.5, "2"])
def test_runner_threads_must_be_a_positive_int(tiny, threads):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    with pytest.raises(LmforgeError, match="threads is the number of CPU threads"):
        ProgramRunner(b.build(_gen(b)), threads=threads)


def test_a_scoring_model_must_cover_the_generators_vocabulary(tiny, fuser):
    """The fuser model's vocabulary (15) is the task's (14) plus a separator: it may score the tiny model's
    candidates, but the tiny model may not score the fuser's (ids up to 14)."""
    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser[1]})
    b.build(b.rank(_gen(b, strategy="sample", n=2), model="fuser"))
    for node in (lambda c: b.rank(c, model="tiny"), lambda c: b.verify(c, model="tiny")):
        c = b.generate("fuser", strategy="sample", n=2, max_new_tokens=ANSWER_LEN, eos_id=EOS)
        with pytest.raises(VerifyError, match=r"vocabulary \(14 tokens\) is smaller than that of model 'fuser' "
                                              r"\(15\)"):
            b.build(node(c))


def test_a_scoring_model_checks_candidate_ids_at_run_time(tiny):
    """Where a vocabulary is known only at run time (a compiled region), an id the scoring model lacks is an
    LmforgeError before the model runs."""
    from types import SimpleNamespace

    from lmforge.programs.runtime import ExecContext, run_node

    node = SimpleNamespace(op="rank", attr={"by": "logprob", "top_k": 1, "eos_id": EOS}, regions=(tiny[1],))
    ctx = ExecContext(lambda *a: pytest.fail("the scoring model ran before its ids were checked"), vocabs={0: VOCAB})
    cands = torch.tensor([[[1, 2, VOCAB + 1, EOS]]])
    with pytest.raises(LmforgeError, match=r"candidate token ids \[15\] are outside the scoring model's"):
        run_node(ctx, 0, node, [torch.tensor([[1, 2, 3]]), cands, torch.zeros(1, 1)])


def test_program_functions_are_checked(tiny, task):
    with pytest.raises(LmforgeError, match="must be callable"):
        register_function("t-not-callable", 5)
    register_function("t-bad-shape", lambda prompt, cands: torch.zeros(cands.shape[0] + 1))
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    graph = b.build(b.rank(_gen(b, strategy="sample", n=2), by="t-bad-shape"))
    with pytest.raises(LmforgeError, match="'t-bad-shape' returned \\(3,\\) for 2 candidates"):
        ProgramRunner(graph).run(task[0][:2])
    register_function("t-words", lambda prompt, cands: ["good"] * cands.shape[0])
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    graph = b.build(b.rank(_gen(b, strategy="sample", n=2), by="t-words"))
    with pytest.raises(LmforgeError, match="'t-words' returned list .* which is not numbers"):
        ProgramRunner(graph).run(task[0][:2])


def test_a_shared_cache_tells_models_of_one_structure_apart(tiny, task):
    """Two checkpoints of one architecture under one name share a GenerationCache without reusing each other's
    generations (the cache key holds a digest of the weights, not only the graph's structure)."""
    from examples.test_time_scaling import capture_steps, task_models

    early = capture_steps(task_models(("tiny-early",)))["tiny-early"]
    cache, prompts = GenerationCache(), task[0][:8]
    results = []
    for step in (tiny[1], early, tiny[1]):
        b = ProgramBuilder("p", {"m": step})
        results.append(ProgramRunner(b.build(b.generate("m", max_new_tokens=ANSWER_LEN, eos_id=EOS)),
                                     cache=cache).run(prompts))
    b = ProgramBuilder("p", {"m": early})
    alone = ProgramRunner(b.build(b.generate("m", max_new_tokens=ANSWER_LEN, eos_id=EOS))).run(prompts)
    assert torch.equal(results[1].tokens, alone.tokens) and not torch.equal(results[0].tokens, alone.tokens)
    assert torch.equal(results[2].tokens, results[0].tokens) and cache.hits == 8   # the third run: all cached


def test_unused_nodes_are_not_run_and_scoring_nodes_name_their_model(tiny, task):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    _gen(b, strategy="sample", n=4)                                    # nothing reads these candidates
    graph = b.build(b.rank(_gen(b, strategy="sample", n=2), model="tiny"))
    assert [n.op for n in graph.nodes] == ["generate", "rank"]
    cost = program_cost(graph, ProgramRunner(graph).run(task[0][:2]), get_target("h100"))
    assert [c.model for c in cost.nodes] == ["tiny", "tiny"] and "tiny" in cost.table().splitlines()[2]


def test_evaluator_and_search_misuse(tiny, task):
    from lmforge.programs.search import ProgramEvaluator, grid, program_space, search

    prompts, answers = task[0][:6], task[1][:6]
    h100 = get_target("h100")
    with pytest.raises(LmforgeError, match="one row per prompt"):
        ProgramEvaluator({"tiny": tiny[1]}, prompts, answers[:4], h100, eos_id=EOS)
    with pytest.raises(LmforgeError, match="needs eos_id"):
        ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, h100)
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, h100, eos_id=EOS)
    space = program_space(["tiny"], n_choices=(2,), max_new_choices=(4,), windows=(0,), kv=("none",),
                          strategies=("greedy", "best_of_n"))
    config = grid(space)[0]
    with pytest.raises(LmforgeError, match="'big' is not one of"):
        ev({**config, "program.model": "big"})
    with pytest.raises(LmforgeError, match="no value for knob 'program.strategy'"):
        ev({"program.model": "tiny"})
    assert ev(config, 100).problems == 6                         # at most the dev set
    s = search(ev, space, budget_eflops=1e30, n_trials=3, fidelities=(3, 16), startup_trials=3)
    assert s.best is not None and all(e.problems == 6 for e in s.evaluations)
