"""The program search on a tiny space: grid enumeration, budget as a constraint, multi-fidelity counts."""
from examples.models.tiny_task import EOS
from lmforge.hwmodels import get_target
from lmforge.programs.search import ProgramEvaluator, grid, grid_search, program_space, search


def test_search_finds_a_feasible_config_with_fewer_evaluations(tiny, task):
    prompts, answers = task
    space = program_space(["tiny"], n_choices=(2, 4), max_new_choices=(3, 4), windows=(0,), kv=("none",),
                          scorer="addition_checker")
    configs = grid(space)
    assert len(configs) == len({tuple(sorted(c.items())) for c in configs}) == 2 * (1 + 2 * 2 + 2 + 2)
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts[:12], answers[:12], get_target("h100"), eos_id=EOS,
                          scorer="addition_checker")
    greedy = ev({**configs[0], "program.strategy": "greedy", "program.max_new_tokens": 4})
    budget = 3 * greedy.eflops
    g = grid_search(ev, space, budget)
    assert g.best.eflops <= budget and all(e.accuracy == 0 for e in g.evaluations
                                          if e.config["program.max_new_tokens"] == 3)
    ev2 = ProgramEvaluator({"tiny": tiny[1]}, prompts[:12], answers[:12], get_target("h100"), eos_id=EOS,
                           scorer="addition_checker")
    ev2.cache = ev.cache
    s = search(ev2, space, budget, n_trials=8, fidelities=(4, 12))
    assert s.problems_evaluated < g.problems_evaluated
    assert s.best is None or s.best.eflops <= budget
