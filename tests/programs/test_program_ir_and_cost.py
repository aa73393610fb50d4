"""Program graphs (registry, Archon rules, JSON, compiled reference) and their cost (Kinetics, shared prefix)."""
import pytest
import torch

from examples.models.tiny_task import EOS
from lmforge.compiler import CompiledModel
from lmforge.errors import VerifyError
from lmforge.hwmodels import get_target, kinetics_best_of_n
from lmforge.ir.graph import Graph
from lmforge.programs import ProgramBuilder, ProgramRunner, program, program_cost
from lmforge.programs.cost import model_dims

H100 = get_target("h100")


def build(step, **attrs):
    b = ProgramBuilder("p", {"tiny": step})
    return b.build(b.generate("tiny", max_new_tokens=attrs.pop("max_new_tokens", 4), **attrs))


def test_unknown_attribute_is_rejected(tiny):
    with pytest.raises(VerifyError, match="no attribute"):
        build(tiny[1], eos_id=EOS, beam_size=3)


@pytest.mark.parametrize("make,message", [
    (lambda b: b.verify(b.generate("tiny", strategy="sample", n=2, max_new_tokens=4)), "checker function"),
    (lambda b: b.generate("tiny", strategy="diverse_beam", width=5, groups=2, max_new_tokens=4), "multiple"),
    (lambda b: b.generate("tiny", strategy="best_of_n", n=4, aggregator="scorer", scorer="nope", max_new_tokens=4),
     "registered"),
    (lambda b: b.generate("tiny", strategy="trie_beam", width=2, max_new_tokens=4), "catalog"),
    (lambda b: b.generate("tiny", strategy="nucleus", max_new_tokens=4), "unknown strategy"),
])
def test_program_rules_give_clear_errors(tiny, make, message):
    b = ProgramBuilder("p", {"tiny": tiny[1]})
    with pytest.raises(VerifyError, match=message):
        b.build(make(b))


def test_first_layer_must_generate(tiny):
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType
    from lmforge.programs import verify_program

    gb = GraphBuilder("bad")
    tok = gb.input("tokens", TensorType(("batch", 3, 4), "int64"))
    sc = gb.input("scores", TensorType(("batch", 3), "float32"))
    out = gb.op("vote", [tok, sc])
    with pytest.raises(VerifyError, match="generate"):
        verify_program(gb.build(list(out)))


def test_compound_program_json_roundtrip_and_compiled_reference(tiny, task):
    prompts, _ = task

    @program("archon")
    def archon(b):
        c = b.ensemble(b.generate("tiny", strategy="sample", n=3, max_new_tokens=4, eos_id=EOS, seed=1),
                       b.generate("tiny", strategy="beam", width=2, max_new_tokens=4, eos_id=EOS))
        c = b.verify(c, checker="addition_checker", first_k=2)
        return b.vote(b.rank(c, by="logprob", top_k=4))

    graph = archon(models={"tiny": tiny[1]})
    again = Graph.from_json(graph.to_json(), graph.weights)
    assert again == graph
    ran = ProgramRunner(again).run(prompts[:6])
    compiled = CompiledModel(graph)(prompts[:6])
    assert torch.equal(compiled[0], ran.tokens)
    assert ran.tokens.shape == (6, 1, 4)
    assert ran.accounts[2].checks <= 6 * 5


@pytest.mark.parametrize("L_out", [3, 5])
def test_best_of_n_cost_grows_as_kinetics_says(tiny, task, L_out):
    """Fixed-length samples (no EOS): the accounting's eFLOPs equal the Kinetics closed form for every N."""
    step = tiny[1]
    prompts, _ = task
    dims = model_dims(step)
    I = H100.peak("bfloat16") / H100.memory_bandwidth
    tensor = []
    for N in (1, 2, 4, 8):
        graph = build(step, strategy="best_of_n", n=N, max_new_tokens=L_out, aggregator="logprob")
        result = ProgramRunner(graph).run(prompts[:2])
        cost = program_cost(graph, result, H100)
        want = kinetics_best_of_n(dims.P, N, prompts.shape[1], L_out, dims.r, dims.D, I)["eflops"]
        assert cost.per_prompt("kinetics_eflops") == pytest.approx(want, rel=1e-9)
        tensor.append(cost.per_prompt("eflops"))
    assert tensor == sorted(tensor) and tensor[0] < tensor[-1]
    slope = [(b - a) / d for a, b, d in zip(tensor, tensor[1:], (1, 2, 4))]  # affine in N, like Kinetics
    assert max(slope) == pytest.approx(min(slope), rel=0.1)


def test_shared_prefix_reduces_bytes_not_outputs(tiny, task):
    from lmforge.programs.runtime import hydragen_region
    from lmforge.search.cost_model import graph_cost

    step = tiny[1]
    prompts, _ = task
    attrs = dict(strategy="sample", n=6, max_new_tokens=4, eos_id=EOS, temperature=1.0, seed=2)
    shared_g, plain_g = build(step, **attrs), build(step, shared_prefix=False, **attrs)
    hydragen = ProgramRunner(shared_g).run(prompts[:8])
    no_hydragen = ProgramRunner(shared_g, hydragen=False).run(prompts[:8])
    unshared = ProgramRunner(plain_g).run(prompts[:8])
    assert torch.equal(hydragen.tokens, unshared.tokens) and torch.equal(no_hydragen.tokens, unshared.tokens)
    c_shared, c_plain = program_cost(shared_g, hydragen, H100), program_cost(plain_g, unshared, H100)
    assert c_shared.nodes[0].kv_bytes_read < c_plain.nodes[0].kv_bytes_read
    assert c_shared.nodes[0].prompt_tokens * 6 == c_plain.nodes[0].prompt_tokens
    assert c_shared.eflops < c_plain.eflops
    rewritten = hydragen_region(shared_g.nodes[0].regions[0], 6)
    env = {"batch": 6, "past": 8}
    assert graph_cost(rewritten, H100, env).bytes < graph_cost(shared_g.nodes[0].regions[0], H100, env).bytes


def test_first_finish_latency_set_by_first_best_of_n_by_longest(tiny, task):
    step = tiny[1]
    prompts, _ = task
    attrs = dict(n=8, temperature=1.5, max_new_tokens=6, eos_id=EOS, seed=4)
    bo = ProgramRunner(build(step, strategy="best_of_n", **attrs)).run(prompts[:6])
    ff = ProgramRunner(build(step, strategy="first_finish", **attrs)).run(prompts[:6])
    for tb, tf in zip(bo.accounts[0].traces, ff.accounts[0].traces):
        assert tf.steps <= tb.steps and tb.rows_per_step[0] == tf.rows_per_step[0] == 8
    c_bo = program_cost(build(step, strategy="best_of_n", **attrs), bo, H100)
    c_ff = program_cost(build(step, strategy="first_finish", **attrs), ff, H100)
    assert c_ff.time_s <= c_bo.time_s
