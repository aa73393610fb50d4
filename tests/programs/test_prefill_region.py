"""A generate (or fuse / rank / verify) node may carry its model's prefill graph as a second region: the prompt is
then prefilled in one call and charged as one prefill run, with the same outputs as the token-by-token feed."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS, make_problems
from lmforge.errors import LmforgeError, VerifyError
from lmforge.hwmodels import get_target
from lmforge.programs import ProgramBuilder, ProgramRunner, program_cost
from lmforge.programs.decoding import StepModel

H100 = get_target("h100")


def _prefill_graph(model):
    from examples.llama_workload import PREFILL_DYNAMIC
    from examples.models.llama import LlamaPrefill
    from lmforge.ir.frontends.torch_export import capture

    return capture(LlamaPrefill(model), (make_problems(2, seed=0)[0],), dynamic=PREFILL_DYNAMIC)


@pytest.fixture(scope="module")
def tiny_prefill(tiny):
    return _prefill_graph(tiny[0])


def _program(step, prefill, **attrs):
    b = ProgramBuilder("p", {"tiny": step}, prefills={"tiny": prefill} if prefill is not None else None)
    return b.build(b.generate("tiny", max_new_tokens=ANSWER_LEN, eos_id=EOS, **attrs))


@pytest.mark.parametrize("attrs", [{}, {"strategy": "best_of_n", "n": 4, "temperature": 1.0},
                                   {"strategy": "beam", "width": 3}, {"strategy": "sample", "n": 3,
                                                                      "shared_prefix": False}])
def test_prefill_region_gives_the_same_outputs_in_one_call_and_costs_less(tiny, tiny_prefill, task, attrs,
                                                                         monkeypatch):
    prompts = task[0][:8]
    fed = ProgramRunner(_program(tiny[1], None, **attrs)).run(prompts)
    graph = _program(tiny[1], tiny_prefill, **attrs)
    assert [len(n.regions) for n in graph.nodes] == [2]
    calls = []
    run = StepModel.run
    monkeypatch.setattr(StepModel, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    once = ProgramRunner(graph).run(prompts)
    assert torch.equal(once.tokens, fed.tokens)
    torch.testing.assert_close(once.scores, fed.scores, rtol=1e-5, atol=1e-5)
    assert len(calls) <= ANSWER_LEN              # decode steps only: the prompt went through the prefill graph
    a, b = program_cost(graph, once, H100), program_cost(_program(tiny[1], None, **attrs), fed, H100)
    assert a.eflops < b.eflops and a.time_s < b.time_s
    assert a.kinetics_eflops == pytest.approx(b.kinetics_eflops)   # Kinetics counts decode tokens only


def test_a_program_with_prefill_regions_round_trips_and_compiles(tiny, tiny_prefill, task):
    import lmforge
    from lmforge.ir.graph import Graph

    graph = _program(tiny[1], tiny_prefill)
    again = Graph.from_json(graph.to_json(), graph.weights)
    assert again.signature() == graph.signature()
    want = ProgramRunner(graph).run(task[0][:4]).tokens
    assert torch.equal(lmforge.compile(again)(task[0][:4])[0], want)


def test_fuser_and_evaluator_use_prefill_graphs(tiny, tiny_prefill, fuser):
    """The fuser reads prompt + candidates (up to ~40 tokens): with its prefill graph that is one call; the
    evaluator applies the pass knobs to the prefill graphs as to the steps (4-bit weights here)."""
    from lmforge.programs.search import ProgramEvaluator

    prompts, answers = make_problems(8, seed=8, split="heldout")
    config = {"program.model": "tiny", "program.strategy": "best_of_n", "program.n": 4,
              "program.aggregator": "fuser", "program.max_new_tokens": ANSWER_LEN, "attn.decode_window": 0,
              "quant.kv": "none", "quant.weight_bits": 4}
    plain = ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, H100, eos_id=EOS, fuser=fuser[1])
    fast = ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, H100, eos_id=EOS, fuser=fuser[1],
                            prefills={"tiny": tiny_prefill}, fuser_prefill=_prefill_graph(fuser[0]))
    a, b = plain(config), fast(config)
    assert a.accuracy == b.accuracy
    assert b.eflops < 0.5 * a.eflops and b.latency_s < a.latency_s


def test_prefill_graphs_must_match_their_model(tiny, tiny_prefill):
    from examples.test_time_scaling import task_models

    other = _prefill_graph(task_models(("tiny-early",))["tiny-early"])   # same shapes, other weights
    with pytest.raises(LmforgeError, match="decode step's weights"):
        ProgramBuilder("p", {"tiny": tiny[1]}, prefills={"tiny": other})
    with pytest.raises(LmforgeError, match="not among the models"):
        ProgramBuilder("p", {"tiny": tiny[1]}, prefills={"big": tiny_prefill})
    b = ProgramBuilder("p", {"tiny": tiny[1]}, prefills={"tiny": tiny[1]})      # a decode step is not a prefill
    with pytest.raises(VerifyError, match="second region must be the model's prefill"):
        b.generate("tiny", max_new_tokens=2)


def test_a_bf16_model_runs_without_a_prefill_region(tiny, task):
    """Without a prefill region the prompt is fed token by token from an empty cache, which must have the step's
    cache dtype (bf16 here, not float32): the float32 model's answers within bf16 rounding, in the runner, in
    lmforge.compile and in a scoring model."""
    import copy

    import lmforge
    from examples.llama_workload import DECODE_DYNAMIC, decode_inputs
    from examples.models.llama import LlamaDecodeStep
    from lmforge.ir.frontends.torch_export import capture

    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    prompts = task[0][:4]
    step = capture(LlamaDecodeStep(model), decode_inputs(model, prompts[:2], 5), dynamic=DECODE_DYNAMIC)
    half = ProgramRunner(_program(step, None, strategy="beam", width=2)).run(prompts)
    full = ProgramRunner(_program(tiny[1], None, strategy="beam", width=2)).run(prompts)
    assert torch.equal(half.tokens, full.tokens)
    torch.testing.assert_close(half.scores, full.scores, rtol=0.05, atol=0.05)    # bf16 arithmetic

    b = ProgramBuilder("p", {"tiny": step})
    graph = b.build(b.rank(b.generate("tiny", strategy="sample", n=3, max_new_tokens=ANSWER_LEN, eos_id=EOS),
                           model="tiny", top_k=2))
    assert [n.attr["kv_dtype"] for n in graph.nodes] == ["bfloat16", "bfloat16"]
    ranked = ProgramRunner(graph).run(prompts)
    got = lmforge.compile(graph)(prompts)
    assert torch.equal(got[0], ranked.tokens) and torch.allclose(got[1], ranked.scores)
