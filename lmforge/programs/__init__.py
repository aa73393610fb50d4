"""LLM programs: decoding strategies and compound (Archon-style) systems as program ops in the IR, their
runtime with token accounting, their cost on a target (roofline + Kinetics eFLOPs), and their search.

    from lmforge.programs import ProgramBuilder, ProgramRunner, program_cost, register_function
    b = ProgramBuilder("bo8", models={"tiny": step_graph})
    graph = b.build(b.generate("tiny", strategy="best_of_n", n=8, aggregator="scorer", scorer="check",
                               max_new_tokens=4, eos_id=12))
    result = ProgramRunner(graph).run(prompts)
    cost = program_cost(graph, result, get_target("h100"))

See docs/programs.md.
"""
from lmforge.programs.builder import Candidates, ProgramBuilder, kv_shape_of, prefix_params, program, verify_program
from lmforge.programs.cost import NodeCost, ProgramCost, program_cost
from lmforge.programs.functions import get_function, has_function, register_function
from lmforge.programs.retrieval import get_corpus, has_corpus, register_corpus
from lmforge.programs.runtime import GenerationCache, NodeAccount, ProgramResult, ProgramRunner

__all__ = ["Candidates", "GenerationCache", "NodeAccount", "NodeCost", "ProgramBuilder", "ProgramCost",
           "ProgramResult", "ProgramRunner", "get_corpus", "get_function", "has_corpus", "has_function",
           "kv_shape_of", "prefix_params", "program", "program_cost", "register_corpus", "register_function",
           "verify_program"]
