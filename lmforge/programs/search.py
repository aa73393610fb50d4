"""Search program knobs together with pass and kernel knobs: accuracy on a dev set (measured by running the
program) vs cost per prompt on a target, under a budget of eFLOPs or of predicted latency (Archon / Kinetics).

    ev = ProgramEvaluator(steps={"tiny": step_graph, ...}, prompts=dev_prompts, answers=dev_answers, hw=h100)
    result = search(ev, space, budget_eflops=2e9, n_trials=30)
    result.best, result.front, result.problems_evaluated
    grid = grid_search(ev, space, budget_eflops=2e9)        # the exhaustive reference
    ev = ProgramEvaluator(..., tune_tiles=True)              # latency with each step's best Triton tile configs
    result = search(ev, space, budget_latency_s=1e-3)

Kernel knobs (the Triton tile configs of lmforge.search.kernel_model) change latency but neither outputs nor
eFLOPs, so with `tune_tiles` each program is charged with the fastest candidate config of every template its
step graphs run (an exact inner minimisation per step graph and shape): the search over program and pass knobs
then sees latencies with tuned kernels, and a latency budget makes the kernel choice matter.

Knobs: which model, strategy (greedy, best_of_n, first_finish, beam) and its parameters, max new tokens,
optionally a retriever and its number of documents (retrieval-augmented prompts: the model decodes them, while
the aggregators, best-of-N's scorer and the fuser, read the user's original prompt; a number of documents larger
than the retriever's corpus is not a program and is pruned), and pass knobs applied to the model's decode step:
a sliding decode window (sparse attention, with 4 sink tokens) and KV-cache int8. Multi-fidelity: a trial is
evaluated on a growing prefix of the dev set (`fidelities`), reports its accuracy after each, and Optuna's median
pruner stops the weak ones.
The budget is an Optuna constraint (`trial.set_constraint`), never a made-up score. Generations are
cached by (model, prompt, seed, sample index) across trials, so a best-of-8 after a best-of-4 decodes
only the 4 new samples.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import optuna
import torch

from lmforge.errors import LmforgeError
from lmforge.passes.base import Knob
from lmforge.passes.decoding import DecodingError, lower_decoding, model_pass_config
from lmforge.passes.shard import ShardError
from lmforge.programs.builder import ProgramBuilder
from lmforge.programs.cost import _StepCosts, program_cost
from lmforge.programs.retrieval import get_corpus
from lmforge.programs.runtime import GenerationCache, ProgramRunner

_SAMPLED = ("program.strategy", ("best_of_n", "first_finish"))


class TooFewDocuments(LmforgeError):
    """The config retrieves more documents than its retriever's corpus holds: not a program (the search prunes it)."""


# configs that are not programs: the grid skips them, the search prunes them (never scored)
NOT_A_PROGRAM = (ShardError, DecodingError, TooFewDocuments)


def program_space(models: Sequence[str], n_choices=(2, 4, 8, 16), max_new_choices=(3, 4),
                  windows=(0, 4), kv=("none", "int8"), scorer: str = "", fuser: bool = False,
                  weight_bits=(16,), retrievers: Sequence[str] = (), retrieve_k=(1, 2, 4, 8),
                  strategies=("greedy", "best_of_n", "first_finish", "beam"), tp=(1,)) -> list[Knob]:
    """The program + pass knobs (conditions as in lmforge.search.space). window 0 = dense attention.

    Best-of-N's aggregator: "vote" (majority over whole answers), "scorer" (the registered function `scorer`,
    when given), and with `fuser`: "fuse_vote" (fuse by a score-weighted token vote) and "fuser" (fuse by the
    generative fuser model). Pass knobs: decode window, KV-cache format, weight-only bits (16 = none).
    retrievers (names of ProgramEvaluator(retrievers=...)): a retrieve step before generation, "none" or one of
    them, and how many documents it inserts (retrieve_k; a k larger than a retriever's corpus is pruned). tp:
    GPUs every model of the program is split over (knob `shard.tp`, lmforge.passes.shard.tensor_parallel_regions;
    offered when tp has more than one value)."""
    aggs = ("vote",) + (("scorer",) if scorer else ()) + (("fuse_vote", "fuser") if fuser else ())
    rag = [Knob("program.retriever", "categorical", "none", choices=("none", *retrievers)),
           Knob("program.retrieve_k", "categorical", retrieve_k[0], choices=tuple(retrieve_k),
                condition=("program.retriever", tuple(retrievers)))] if retrievers else []
    return rag + [
        Knob("program.model", "categorical", models[0], choices=tuple(models)),
        Knob("program.strategy", "categorical", strategies[0], choices=tuple(strategies)),
        Knob("program.n", "categorical", n_choices[0], choices=tuple(n_choices), condition=_SAMPLED),
        Knob("program.aggregator", "categorical", "vote", choices=aggs, condition=("program.strategy", ("best_of_n",))),
        Knob("program.width", "categorical", 2, choices=(2, 4), condition=("program.strategy", ("beam",))),
        Knob("program.max_new_tokens", "categorical", max_new_choices[-1], choices=tuple(max_new_choices)),
        Knob("attn.decode_window", "categorical", 0, choices=tuple(windows), doc="0 = dense"),
        Knob("quant.kv", "categorical", "none", choices=tuple(kv)),
        Knob("quant.weight_bits", "categorical", weight_bits[0], choices=tuple(weight_bits),
             doc="weight-only quantization of the generator's linears (16 = none)"),
    ] + ([Knob("shard.tp", "categorical", tp[0], choices=tuple(tp), doc="tensor-parallel GPUs per model")]
         if len(tp) > 1 else [])


def grid(knobs: Sequence[Knob]) -> list[dict]:
    """Every distinct config of the space (knobs whose condition fails take their default)."""
    from lmforge.search.space import ordered

    configs = [{}]
    for k in ordered(knobs):
        nxt = []
        for c in configs:
            if k.condition and c.get(k.condition[0]) not in k.condition[1]:
                nxt.append({**c, k.name: k.default})
            else:
                nxt += [{**c, k.name: v} for v in k.choices]
        configs = nxt
    return configs


@dataclass
class Evaluation:
    config: dict
    accuracy: float
    eflops: float            # tensor cost model, per prompt
    kinetics_eflops: float   # per prompt
    latency_s: float         # per prompt (critical path)
    problems: int


class ProgramEvaluator:
    """Builds, runs and costs the program of a config on the first `n` dev problems (results memoized)."""

    def __init__(self, steps: Mapping[str, Any] | None, prompts: torch.Tensor, answers: torch.Tensor, hw, *,
                 eos_id: int | None = None, scorer: str = "", temperature: float = 1.0, seed: int = 0,
                 fuser: Any = None,
                 group_size: int = 32, tune_tiles: bool = False, batch_prompts: bool = True,
                 retrievers: Mapping[str, tuple[str, str]] | None = None, insert_at: int = 0,
                 prefills: Mapping[str, Any] | None = None, fuser_prefill: Any = None, program: Any = None):
        """steps: model -> decode step, for the built-in template (`build`); or `program`: the user's own program
        graph, whose knobs are `lmforge.passes.decoding.decoding_knobs(program, ...)` (plus `shard.tp`), lowered
        per config by `lower_decoding` (steps, eos_id, scorer, fuser, retrievers and prefills are then unused:
        the program holds its models and attributes)."""
        if (steps is None) == (program is None):
            raise LmforgeError("ProgramEvaluator takes either steps= (the built-in program template) or program= "
                               "(your own program graph), not both or neither")
        if steps is not None and eos_id is None:
            raise LmforgeError("ProgramEvaluator(steps=...) needs eos_id= (the end-of-sequence token of the models)")
        if not isinstance(answers, torch.Tensor) or answers.dim() != 2 or answers.dtype != torch.long or \
                answers.shape[0] != len(prompts):
            got = f"{answers.dtype} {tuple(answers.shape)}" if isinstance(answers, torch.Tensor) else type(answers)
            raise LmforgeError(f"answers must be a LongTensor [n_problems, answer_len] with one row per prompt "
                               f"({len(prompts)} prompts), got {got}")
        self.program = program
        self.steps, self.prompts, self.answers, self.hw = dict(steps or {}), prompts, answers, hw
        self.eos_id, self.scorer, self.temperature, self.seed = eos_id, scorer, temperature, seed
        self.fuser, self.group_size = fuser, group_size   # fuser: the fuser model's decode step (full precision)
        self.tune_tiles = tune_tiles  # charge latency with each step's best Triton tile configs (GPU targets)
        self.batch_prompts = batch_prompts  # False: the runner decodes one prompt at a time (same results, slower)
        # knob value -> (registered corpus, method); the documents go into the prompt at insert_at
        self.retrievers, self.insert_at = dict(retrievers or {}), insert_at
        # model -> its prefill graph (the pass knobs are applied to it as to the step): prompts in one call
        self.prefills, self.fuser_prefill = dict(prefills or {}), fuser_prefill
        self.cache = GenerationCache()
        self._lowered: dict = {}   # lower_decoding's cache of lowered regions (program=...)
        self._variants: dict[tuple, Any] = {}
        self._costs: dict[tuple, _StepCosts] = {}
        self.memo: dict[tuple, Evaluation] = {}
        self.problems_evaluated = 0

    def step_variant(self, model: str, window: int = 0, kv: str = "none", weight_bits: int = 16,
                     prefill: bool = False):
        """The model's decode step (its prefill graph with prefill=True) after the pass knobs, run through
        lmforge's tunable pass pipeline: sparse decode window (4 sinks), KV-cache format, weight-only int8/int4
        (group-wise, `group_size`); the fusion passes stay off so that only these knobs change the graph."""
        from lmforge.passes import PassManager, tunable_pipeline

        key = (model, window, kv, weight_bits, prefill)
        if model not in self.steps:
            raise LmforgeError(f"model {model!r} is not one of ProgramEvaluator(steps=...): {sorted(self.steps)}")
        if key not in self._variants:
            config = model_pass_config(window, kv, weight_bits, self.group_size)
            graph = self.prefills[model] if prefill else self.steps[model]
            self._variants[key] = PassManager(tunable_pipeline()).run(graph, config)
        return self._variants[key]

    def _variant_key(self, c: Mapping[str, Any]) -> tuple:
        if self.program is not None:
            return tuple(sorted((k, v) for k, v in c.items() if k.startswith("model.")))
        return (c["program.model"], c.get("attn.decode_window", 0), c.get("quant.kv", "none"),
                c.get("quant.weight_bits", 16))

    def build(self, c: Mapping[str, Any]):
        from lmforge.passes.shard import tensor_parallel_regions

        if self.program is not None:
            program = lower_decoding(self.program, c, group_size=self.group_size, cache=self._lowered)
        else:
            try:
                program = self._build(c)
            except KeyError as e:
                raise LmforgeError(f"the config has no value for knob {e.args[0]!r}: use a config of the space's "
                                   "knobs (lmforge.programs.search.program_space, grid, search)") from None
        return tensor_parallel_regions(program, c.get("shard.tp", 1))

    def _build(self, c: Mapping[str, Any]):
        model = c["program.model"]
        models = {model: self.step_variant(*self._variant_key(c))}
        prefills = {model: self.step_variant(*self._variant_key(c), prefill=True)} if model in self.prefills else {}
        s, agg = c["program.strategy"], c.get("program.aggregator", "vote")
        fused = s == "best_of_n" and agg in ("fuse_vote", "fuser")
        if fused and agg == "fuser":
            if self.fuser is None:
                raise LmforgeError("aggregator 'fuser' needs ProgramEvaluator(fuser=<the fuser's decode step>)")
            models["fuser"] = self.fuser
            if self.fuser_prefill is not None:
                prefills["fuser"] = self.fuser_prefill
        b = ProgramBuilder("program", models, prefills=prefills)
        attrs = dict(max_new_tokens=c["program.max_new_tokens"], eos_id=self.eos_id, strategy=s, seed=self.seed)
        retriever = c.get("program.retriever", "none")
        if retriever != "none":
            if retriever not in self.retrievers:
                raise LmforgeError(f"retriever {retriever!r} is not one of ProgramEvaluator(retrievers=...): "
                                   f"{sorted(self.retrievers)}")
            corpus, method = self.retrievers[retriever]
            n_docs = get_corpus(corpus).n_docs
            if c["program.retrieve_k"] > n_docs:
                raise TooFewDocuments(f"retriever {retriever!r}: k={c['program.retrieve_k']} documents from corpus "
                                      f"{corpus!r} of {n_docs}")
            attrs["prompts"] = b.retrieve(corpus, c["program.retrieve_k"], method, self.insert_at)
        if fused:  # n samples, then a fuse node reads them all
            attrs.update(strategy="sample", n=c["program.n"], temperature=self.temperature)
            cands = b.generate(model, **attrs)
            return b.build(b.fuse(cands, by="model", model="fuser") if agg == "fuser" else b.fuse(cands))
        if s in ("best_of_n", "first_finish"):
            attrs.update(n=c["program.n"], temperature=self.temperature)
        if s == "best_of_n":
            attrs.update(aggregator=agg, scorer=self.scorer if agg == "scorer" else "")
        if s == "beam":
            attrs.update(width=c["program.width"])
        return b.build(b.generate(model, **attrs))

    def __call__(self, config: Mapping[str, Any], n: int | None = None) -> Evaluation:
        """Run and cost the config's program on the first n dev problems (all when n is None or larger)."""
        n = min(n or len(self.prompts), len(self.prompts))
        key = (tuple(sorted(config.items())), n)
        if key in self.memo:
            return self.memo[key]
        graph = self.build(config)
        result = ProgramRunner(graph, cache=self.cache, batch_prompts=self.batch_prompts).run(self.prompts[:n])
        step_costs = self._costs.setdefault(self._variant_key(config), _StepCosts(self.hw, self.tune_tiles))
        cost = program_cost(graph, result, self.hw, step_costs=step_costs)
        T = min(result.tokens.shape[-1], self.answers.shape[1])
        correct = (result.tokens[:, 0, :T] == self.answers[:n, :T]).all(1) & (T == self.answers.shape[1])
        ev = Evaluation(dict(config), float(correct.float().mean()), cost.per_prompt("eflops"),
                        cost.per_prompt("kinetics_eflops"), cost.per_prompt("time_s"), n)
        self.problems_evaluated += n
        self.memo[key] = ev
        return ev


@dataclass
class SearchResult:
    best: Evaluation | None
    evaluations: list[Evaluation]
    front: list[Evaluation]
    problems_evaluated: int
    trials: int
    pruned: int
    study: Any = field(repr=False, default=None)


def _stored(trial) -> Evaluation:
    """The full-fidelity evaluation a finished trial stored (a resumed search's earlier results)."""
    return Evaluation(**trial.user_attrs["evaluation"])


def pareto_front(evals: Sequence[Evaluation]) -> list[Evaluation]:
    """Accuracy up, eFLOPs down; one point per distinct (accuracy, eFLOPs), cheapest first."""
    pts = sorted(evals, key=lambda e: (e.eflops, -e.accuracy))
    front, best_acc = [], -1.0
    for e in pts:
        if e.accuracy > best_acc:
            front.append(e)
            best_acc = e.accuracy
    return front


def _budget(budget_eflops: float | None, budget_latency_s: float | None) -> tuple[str, float]:
    """(Evaluation field, limit) of the one budget given: eFLOPs per prompt or predicted seconds per prompt."""
    if (budget_eflops is None) == (budget_latency_s is None):
        raise LmforgeError("give exactly one budget: budget_eflops (eFLOPs per prompt) or budget_latency_s "
                           "(predicted seconds per prompt on the target)")
    return ("eflops", budget_eflops) if budget_eflops is not None else ("latency_s", budget_latency_s)


def _check_retrieve_k(ev: ProgramEvaluator, knobs: Sequence[Knob]) -> None:
    """An LmforgeError when a retriever of the space can insert none of the space's retrieve_k values (its corpus
    has fewer documents than the smallest): that retriever's every config would be pruned."""
    by_name = {k.name: k for k in knobs}
    if ev.program is not None or "program.retriever" not in by_name or "program.retrieve_k" not in by_name:
        return
    ks = tuple(by_name["program.retrieve_k"].choices)
    for name in by_name["program.retriever"].choices:
        if name in ev.retrievers:
            corpus = ev.retrievers[name][0]
            n_docs = get_corpus(corpus).n_docs
            if min(ks) > n_docs:
                raise LmforgeError(f"retriever {name!r} (corpus {corpus!r} of {n_docs} documents) can retrieve none "
                                   f"of program_space(retrieve_k={ks}): give retrieve_k values of at most {n_docs}")


def grid_search(ev: ProgramEvaluator, knobs: Sequence[Knob], budget_eflops: float | None = None, *,
                budget_latency_s: float | None = None) -> SearchResult:
    """Evaluate every config on the full dev set (the exhaustive reference); the best is the most accurate
    within the budget (eFLOPs, or predicted latency on the target)."""
    field_name, limit = _budget(budget_eflops, budget_latency_s)
    _check_retrieve_k(ev, knobs)
    before = ev.problems_evaluated
    evals = []
    for c in grid(knobs):
        try:
            evals.append(ev(c))
        except NOT_A_PROGRAM:
            continue   # a tp the heads do not divide by, a strategy the program cannot take, k > the corpus
    feasible = [e for e in evals if getattr(e, field_name) <= limit]
    best = max(feasible, key=lambda e: (e.accuracy, -getattr(e, field_name)), default=None)
    return SearchResult(best, evals, pareto_front(evals), ev.problems_evaluated - before, len(evals), 0)


def search(ev: ProgramEvaluator, knobs: Sequence[Knob], budget_eflops: float | None = None, n_trials: int = 30, *,
           fidelities: Sequence[int] | None = None, seed: int = 0, max_problems: int | None = None,
           startup_trials: int | None = None, budget_latency_s: float | None = None, storage: str | None = None,
           study_name: str = "program-search") -> SearchResult:
    """TPE over the knobs, maximizing dev accuracy subject to eFLOPs per prompt <= budget (a constraint),
    with a growing dev subset and Optuna's median pruner (module docstring). max_problems: stop the study
    once this many dev-problem evaluations are spent (the search's budget in the currency of the grid).
    startup_trials: random trials before TPE models the results (default n_trials // 4).

    storage: an Optuna storage URL (e.g. "sqlite:///programs.db"; default in memory) that keeps every finished
    trial: a crashed or interrupted search resumes with `study_name`, running only the trials left of n_trials,
    and its result covers the earlier trials too (each trial stores its evaluation). Ctrl-C stops a search and
    returns what it finished."""
    from lmforge.search.space import suggest

    field_name, limit = _budget(budget_eflops, budget_latency_s)
    _check_retrieve_k(ev, knobs)
    full = len(ev.prompts)
    fidelities = sorted({max(1, min(int(n), full)) for n in (fidelities or (full // 4, full // 2, full))})
    if fidelities[-1] != full:
        fidelities.append(full)   # a trial's last evaluation is on the whole dev set: that is what it is scored on
    before = ev.problems_evaluated
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # group=True (conditional knobs modelled jointly) is "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                             n_startup_trials=startup_trials or max(4, n_trials // 4))
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage, study_name=study_name,
                                load_if_exists=storage is not None,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    finals: list[Evaluation] = [_stored(t) for t in study.trials if "evaluation" in t.user_attrs]

    def objective(trial):
        config = suggest(trial, knobs)
        e = None
        for step, n in enumerate(fidelities):
            try:
                e = ev(config, n)
            except NOT_A_PROGRAM as err:   # not a program (see grid_search): pruned, never scored
                trial.set_user_attr("pruned_reason", str(err))
                raise optuna.TrialPruned(str(err)) from err
            over = getattr(e, field_name) - limit
            if over > 0:
                break  # infeasible: its cost is known, more problems would not change that
            trial.report(e.accuracy, step)
            if n < full and trial.should_prune():
                trial.set_constraint(field_name, over)
                raise optuna.TrialPruned()
        trial.set_constraint(field_name, getattr(e, field_name) - limit)
        if e.problems == full:
            finals.append(e)
            trial.set_user_attr("evaluation", asdict(e))
        return e.accuracy

    def out_of_problems(study, trial):
        if max_problems is not None and ev.problems_evaluated - before >= max_problems:
            study.stop()

    finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                   for t in study.trials)
    try:
        study.optimize(objective, n_trials=max(0, n_trials - finished), callbacks=[out_of_problems])
    except KeyboardInterrupt:
        pass  # the finished trials are in `finals` (and in the storage, when there is one)
    except ValueError as e:
        if "dynamic value space" not in str(e):
            raise
        raise LmforgeError(f"study {study_name!r} in {storage} was run with other values of a knob ({e}); resume "
                           "it with the same space, or start a new study_name") from None
    feasible = [e for e in finals if getattr(e, field_name) <= limit]
    best = max(feasible, key=lambda e: (e.accuracy, -getattr(e, field_name)), default=None)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return SearchResult(best, finals, pareto_front(finals), ev.problems_evaluated - before, len(study.trials), pruned,
                        study)
