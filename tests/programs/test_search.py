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


def test_an_interrupted_search_keeps_its_trials_and_resumes(tiny, task, tmp_path):
    """With a storage URL every finished trial is kept: Ctrl-C returns what was finished, and the same call again
    runs only the trials left, its result covering the earlier ones."""
    prompts, answers = task
    space = program_space(["tiny"], n_choices=(2, 4), max_new_choices=(4,), windows=(0,), kv=("none",))
    storage = f"sqlite:///{tmp_path / 'programs.db'}"

    class Interrupting(ProgramEvaluator):
        calls = 0

        def __call__(self, config, n=None):
            Interrupting.calls += 1
            if Interrupting.calls == 4:
                raise KeyboardInterrupt
            return super().__call__(config, n)

    def evaluator(cls):
        return cls({"tiny": tiny[1]}, prompts[:8], answers[:8], get_target("h100"), eos_id=EOS)

    budget = 1e12
    first = search(evaluator(Interrupting), space, budget, n_trials=6, fidelities=(8,), storage=storage,
                   study_name="resume-me")
    assert first.trials == 4 and len(first.evaluations) == 3     # the 4th trial was interrupted
    again = search(evaluator(ProgramEvaluator), space, budget, n_trials=6, fidelities=(8,), storage=storage,
                   study_name="resume-me")
    finished = [t for t in again.study.trials if t.state.name == "COMPLETE"]
    assert len(finished) == 6 and len(again.evaluations) == 6
    assert again.problems_evaluated <= 3 * 8                     # only the 3 missing trials ran
    assert {tuple(sorted(e.config.items())) for e in first.evaluations} <= \
        {tuple(sorted(e.config.items())) for e in again.evaluations}
