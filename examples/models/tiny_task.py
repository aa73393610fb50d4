"""A synthetic task with checkable answers (2-digit addition) and a deterministic trainer for it.

Why it exists: lmforge's quality objectives need a model whose outputs can be graded exactly. A tiny
Llama trained in well under a minute on the CPU to add two 2-digit numbers gives that: exact-match
accuracy on held-out problems says whether a compiled or compressed model still works, and the
held-out token sequences give next-token distributions to compare with the original model's at the answer
positions (top-1 agreement, KL: the tuner's `quality` and `kl`).

Format. Tokens 0-9 are the digits, then '+', '=', EOS and PAD (14 tokens). A problem a + b with
0 <= a, b <= 99 is the prompt "aa+bb=" (operands zero-padded to 2 digits, so every prompt has 6
tokens) and the answer is the 3 digits of the sum written least significant digit first, then EOS
(4 tokens). Reversing the sum lets the model emit each digit after the carry that decides it:

    47 + 8 = 55   ->   prompt "47+08=",   answer "550" EOS

Why 2 digits: with 3-digit operands the same model needs more steps than a one-minute CPU budget
allows (the tens digit of the sum was still at chance after 2000 steps).

PAD is in the vocabulary for callers that batch ragged sequences; the task itself never needs it.

Held-out split. A fixed 1/16 of all (a, b) operand pairs, chosen by a hash of the pair, is held out:
training never samples them, and `make_problems(..., split="heldout")`, `accuracy` and
`eval_token_data` only use them (drawn with replacement from the 625 held-out pairs).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

try:
    import fcntl  # POSIX file locks; without them concurrent first calls just train twice
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, greedy_generate
from lmforge.cache import cache_dir
from lmforge.errors import LmforgeError

N_DIGITS = 2
PLUS, EQUALS, EOS, PAD = 10, 11, 12, 13
VOCAB_SIZE = 14
PROMPT_LEN = 2 * N_DIGITS + 2        # "aa+bb="
ANSWER_LEN = N_DIGITS + 2            # reversed sum digits (N+1) + EOS
HELD_OUT_FRACTION = 16               # one operand pair in 16 is held out

# Bump when the task, the data stream or the trainer changes, so cached weights are retrained.
RECIPE_VERSION = "tiny-task-v1"


@dataclass(frozen=True)
class TrainRecipe:
    """Everything besides the model config that decides the trained weights."""

    steps: int
    batch_size: int
    seed: int = 0
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01


# Trainable presets and their recipes: the smallest found that reaches >= 95% held-out accuracy with
# margin across seeds. "tiny" at 1000 steps: 99-100% for seeds 0-3, 24-31 s on a 2-core CPU (2 threads).
# Shorter runs sit on a loss plateau for a seed-dependent time: 800 steps gave 98-99% (seeds 0-1),
# 600 steps left seed 0 at 5%; dim 48 at 800 steps left seed 3 at 18%.
RECIPES: dict[str, TrainRecipe] = {"tiny": TrainRecipe(steps=1000, batch_size=128),
                                   "small": TrainRecipe(steps=600, batch_size=128)}


# ---- problems ---------------------------------------------------------------------------------------

def is_held_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bool mask of operand pairs in the held-out set (a fixed pseudo-random 1/16 of all pairs)."""
    pair = a.long() * 10 ** N_DIGITS + b.long()
    mixed = (pair * 2654435761) % (2 ** 32)   # Knuth's multiplicative hash spreads nearby pairs apart
    return (mixed >> 16) % HELD_OUT_FRACTION == 0


def sample_operands(n: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n operand pairs drawn uniformly from the training pairs or from the held-out pairs."""
    if split not in ("train", "heldout"):
        raise LmforgeError(f"split must be 'train' or 'heldout', got {split!r}")
    a = torch.empty(n, dtype=torch.long)
    b = torch.empty(n, dtype=torch.long)
    todo = torch.ones(n, dtype=torch.bool)
    while todo.any():  # rejection sampling; a few rounds for train, ~16x oversampling per round for heldout
        count = int(todo.sum())
        draw = 16 * count if split == "heldout" else count
        cand_a = torch.randint(0, 10 ** N_DIGITS, (draw,), generator=generator)
        cand_b = torch.randint(0, 10 ** N_DIGITS, (draw,), generator=generator)
        keep = is_held_out(cand_a, cand_b) == (split == "heldout")
        cand_a, cand_b = cand_a[keep][:count], cand_b[keep][:count]
        slots = todo.nonzero().squeeze(1)[: len(cand_a)]
        a[slots], b[slots] = cand_a, cand_b
        todo[slots] = False
    return a, b


def digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """Most-significant-first decimal digits of x [n] as [n, width] (zero-padded)."""
    powers = 10 ** torch.arange(width - 1, -1, -1)
    return (x[:, None] // powers) % 10


def encode(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands [n] -> (prompts [n, PROMPT_LEN], answers [n, ANSWER_LEN]) in the format of the docstring."""
    n = a.shape[0]
    plus = torch.full((n, 1), PLUS)
    equals = torch.full((n, 1), EQUALS)
    prompts = torch.cat((digits(a, N_DIGITS), plus, digits(b, N_DIGITS), equals), dim=1)
    reversed_sum = digits(a + b, N_DIGITS + 1).flip(1)
    answers = torch.cat((reversed_sum, torch.full((n, 1), EOS)), dim=1)
    return prompts, answers


def make_problems(n: int, seed: int, split: str = "heldout") -> tuple[torch.Tensor, torch.Tensor]:
    """n problems as (prompts LongTensor [n, 6], answers LongTensor [n, 4]); split "heldout" or "train"."""
    generator = torch.Generator().manual_seed(seed)
    return encode(*sample_operands(n, generator, split))


def eval_token_data(n: int = 256, seed: int = 4321) -> torch.Tensor:
    """Held-out full sequences prompt + answer, LongTensor [n, 10]: quality data (next-token distributions; the
    model is trained on the positions that predict the answer, PROMPT_LEN - 1 to PROMPT_LEN + ANSWER_LEN - 2)."""
    prompts, answers = make_problems(n, seed, split="heldout")
    return torch.cat((prompts, answers), dim=1)


# ---- training ---------------------------------------------------------------------------------------

def lr_at(step: int, recipe: TrainRecipe) -> float:
    """Linear warmup to recipe.lr, then cosine decay to recipe.lr * min_lr_ratio."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def answer_loss(model: Llama, prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens only, with teacher forcing over prompt + answer[:-1]."""
    inputs = torch.cat((prompts, answers[:, :-1]), dim=1)
    logits = model(inputs)[:, PROMPT_LEN - 1:]       # position i predicts token i + 1
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))


def train_with_recipe(config: LlamaConfig, recipe: TrainRecipe) -> Llama:
    """Train a fresh Llama(config) on the training split; deterministic for a given recipe and thread count.

    The global torch RNG is left as it was: initialisation runs inside fork_rng, and data come from
    a private generator seeded from recipe.seed.
    """
    if config.vocab_size != VOCAB_SIZE or config.max_seq_len < PROMPT_LEN + ANSWER_LEN:
        raise LmforgeError(f"the addition task needs vocab_size={VOCAB_SIZE} and max_seq_len >= "
                           f"{PROMPT_LEN + ANSWER_LEN}; got {config.vocab_size} and {config.max_seq_len}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Llama(config)
    data = torch.Generator().manual_seed(recipe.seed + 1)

    def loss_at(step: int) -> torch.Tensor:
        return answer_loss(model, *encode(*sample_operands(recipe.batch_size, data, "train")))

    return fit(model, recipe, loss_at)


def fit(model: Llama, recipe, loss_at: Callable[[int], torch.Tensor]) -> Llama:
    """The training loop the task modules share: AdamW (betas 0.9/0.98, weight decay on matrices only), the
    warmup + cosine schedule of `lr_at`, gradient clipping at 1.0, `recipe.steps` steps of `loss_at(step)`.
    recipe needs steps, lr, warmup_steps, min_lr_ratio and weight_decay. Returns the model in eval mode."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def train(config: LlamaConfig, steps: int, seed: int = 0, batch_size: int = 128, **recipe_overrides) -> Llama:
    """Train a Llama(config) on the addition task for `steps` AdamW steps (see TrainRecipe for the rest)."""
    return train_with_recipe(config, TrainRecipe(steps=steps, batch_size=batch_size, seed=seed, **recipe_overrides))


# ---- evaluation -------------------------------------------------------------------------------------

def accuracy(step_fn, n: int = 256, seed: int = 1234, *, config: LlamaConfig | None = None,
             batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy decoding with `step_fn(tok, k, v) -> (logits, k, v)` on n held-out problems.

    step_fn is a decode step (eager LlamaDecodeStep, an exported program's module, a compiled model):
    the prompt is fed one token at a time, so nothing but the decode step is needed. config gives the
    cache shapes; by default step_fn.empty_cache if it has one, else the "tiny" preset.
    """
    if config is not None:
        empty_cache = config.empty_cache
    else:
        empty_cache = getattr(step_fn, "empty_cache", None) or LlamaConfig.preset("tiny").empty_cache
    prompts, answers = make_problems(n, seed, split="heldout")
    generated = [greedy_generate(step_fn, prompts[start:start + batch_size], ANSWER_LEN, eos_id=EOS,
                                 empty_cache=empty_cache) for start in range(0, n, batch_size)]
    return exact_match(torch.cat(generated), answers)


@torch.no_grad()
def prefill_accuracy(prefill_fn, n: int = 256, seed: int = 1234) -> float:
    """Exact-match accuracy using only a prefill callable `prefill_fn(tokens) -> (logits, k, v)`.

    Without a decode step there is no cache to carry: each new token re-runs prefill on the whole
    sequence so far (quadratic, but the task's sequences are 10 tokens long).
    """
    prompts, answers = make_problems(n, seed, split="heldout")
    sequence = prompts
    for _ in range(ANSWER_LEN):
        logits = prefill_fn(sequence)[0]
        sequence = torch.cat((sequence, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return exact_match(sequence[:, PROMPT_LEN:], answers)


def exact_match(generated: torch.Tensor, answers: torch.Tensor) -> float:
    """Fraction of rows whose every generated token (EOS included) equals the answer."""
    return float((generated == answers).all(dim=1).float().mean())


# ---- cache ------------------------------------------------------------------------------------------

def recipe_hash(config: LlamaConfig, recipe: TrainRecipe) -> str:
    """Short hash of everything that decides the trained weights: config, recipe and RECIPE_VERSION."""
    blob = json.dumps({"config": config.to_dict(), "recipe": asdict(recipe), "version": RECIPE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train(config_name: str = "tiny") -> Llama:
    """The trained task model for a preset, from cache_dir("models") if there, else trained and cached.

    Files: tiny_task-<hash>.safetensors (weights) and tiny_task-<hash>.json (config, recipe, accuracy
    on 512 held-out problems, training time). Delete them to retrain. Processes that ask at the same
    time (pytest-xdist workers) train once: the others wait on a lock file, then load.
    """
    if config_name not in RECIPES:
        raise LmforgeError(f"no training recipe for preset {config_name!r}; trainable presets: {sorted(RECIPES)}")
    config, recipe = LlamaConfig.preset(config_name), RECIPES[config_name]
    stem = cache_dir("models") / f"tiny_task-{recipe_hash(config, recipe)}"
    return load_or_train_cached(config, stem, lambda: train_and_describe(config, recipe))


def load_or_train_cached(config: LlamaConfig, stem: Path, train_fn: Callable[[], tuple[Llama, dict]]) -> Llama:
    """The Llama(config) cached at <stem>.safetensors, else `train_fn() -> (model, info)` run once and cached.

    Shared by the task modules (addition, recall, fuser). Concurrent first callers train once: the others wait
    on <stem>.lock, then load. The weights and <stem>.json (info: config, recipe, accuracy, training time) are
    written atomically, so a reader never sees half a file; unreadable files are retrained.
    """
    model = load_cached(config, stem)
    if model is not None:
        return model
    with open(stem.with_suffix(".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        model = load_cached(config, stem)
        if model is None:
            model, info = train_fn()
            save_cached(model, info, stem)
    return model


def load_cached(config: LlamaConfig, stem: Path) -> Llama | None:
    """The cached model at <stem>.safetensors, or None when it is missing or unreadable (then it is retrained)."""
    weights_path, info_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (weights_path.exists() and info_path.exists()):
        return None
    model = Llama(config)
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except (OSError, RuntimeError, SafetensorError):
        return None
    return model.eval()


def save_cached(model: Llama, info: dict, stem: Path) -> None:
    """Write <stem>.safetensors and <stem>.json under temporary names, then rename (weights first)."""
    weights_path, info_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tmp_weights, tmp_info = f"{weights_path}.{os.getpid()}.tmp", f"{info_path}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_weights)
    with open(tmp_info, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_info, info_path)


def train_and_describe(config: LlamaConfig, recipe: TrainRecipe) -> tuple[Llama, dict]:
    """Train, and measure held-out accuracy: (model, info for the cache's json)."""
    start = time.perf_counter()
    model = train_with_recipe(config, recipe)
    seconds = time.perf_counter() - start
    info = {"config": config.to_dict(), "recipe": asdict(recipe), "version": RECIPE_VERSION,
            "heldout_accuracy_512": accuracy(LlamaDecodeStep(model), n=512), "train_seconds": round(seconds, 2),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    return model, info


def train_and_cache(config: LlamaConfig, recipe: TrainRecipe, stem: Path) -> Llama:
    """Train, measure held-out accuracy, and write <stem>.safetensors and <stem>.json atomically."""
    model, info = train_and_describe(config, recipe)
    save_cached(model, info, stem)
    return model
