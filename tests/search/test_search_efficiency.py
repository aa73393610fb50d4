"""The arithmetic of benchmarks/search_efficiency.py on a small synthetic space (no model is built): the
enumeration, the best configuration and the exact chance that a random draw is near-optimal."""
import itertools
import math
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.search_efficiency import Space, active, pass_configs  # noqa: E402
from lmforge.passes.base import Knob  # noqa: E402
from lmforge.search.kernel_model import KernelTable  # noqa: E402
from lmforge.search.space import suggest  # noqa: E402

PASS = [Knob("p.mode", "categorical", "a", choices=("a", "b", "c")),
        Knob("p.size", "categorical", 1, choices=(1, 2), condition=("p.mode", ("b", "c")))]
KERNEL = [Knob("triton.tile", "categorical", 0, choices=(0, 1, 2), condition=("p.mode", ("c",)))]
# fixed time per pass config, and the tile template's time per config where it runs
FIXED = {("a", None): 10.0, ("b", 1): 9.0, ("b", 2): 8.0, ("c", 1): 7.0, ("c", 2): 6.5}
TILE = [1.0, 0.4, 2.0]


def _space() -> Space:
    tables = {}
    for cfg in pass_configs(PASS):
        key = (cfg["p.mode"], cfg.get("p.size"))
        per = {"tile": list(TILE)} if cfg["p.mode"] == "c" else {}
        tables[active(PASS, cfg)] = KernelTable(FIXED[key], per, {})
    return Space(PASS, KERNEL, tables)


def test_enumeration_and_optimum():
    space = _space()
    values, best = space.all_values()
    expected = [10.0, 9.0, 8.0] + [f + t for f in (7.0, 6.5) for t in TILE]
    assert sorted(values) == sorted(expected), "one value per distinct configuration, inactive knobs left out"
    assert best == {"p.mode": "c", "p.size": 2, "triton.tile": 1} and space.value(best) == min(expected) == 6.9


def test_random_hit_probability_is_exact():
    space = _space()
    target = 7.5  # hits: (c, 1, tile 1) = 7.4, (c, 2, tile 0) = 7.5, (c, 2, tile 1) = 6.9
    # by hand: mode c with p 1/3; size 1 (1/2) then 1 of 3 tiles, size 2 (1/2) then 2 of 3 tiles
    exact = 1 / 3 * (1 / 2 * 1 / 3 + 1 / 2 * 2 / 3)
    assert math.isclose(space.random_hit_probability(target), exact)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    hits = 0
    for _ in range(3000):
        trial = study.ask()
        value = space.value(suggest(trial, space.knobs))
        study.tell(trial, value)
        hits += value <= target
    assert abs(hits / 3000 - exact) < 0.03, "Optuna's random sampler draws as the formula assumes"


def test_every_configuration_is_reachable_by_value():
    space = _space()
    values, _ = space.all_values()
    by_value = set()
    for mode, size, tile in itertools.product(("a", "b", "c"), (1, 2), (0, 1, 2)):
        by_value.add(space.value({"p.mode": mode, "p.size": size, "triton.tile": tile}))
    assert by_value == set(values)
