"""A generative fuser for the 2-digit addition task (Archon's fuser): a small Llama that reads the prompt and
k candidate answers and writes a new answer.

Why it exists: Archon's `fuse` is an LM that reads the prompt plus the candidates and generates a fused answer.
The task models (examples/models/tiny_task.py) cannot read candidates, so this module trains one that can,
and `lmforge.programs` runs it as the region of a `fuse` node (`ProgramBuilder.fuse(c, by="model", ...)`).

Format. The fuser's vocabulary is the task's 14 tokens plus one separator SEP = 14 (digit ids unchanged,
SEP is the last id: the program runtime finds it as `vocab_size - 1`). Its input is

    prompt  SEP cand_1  SEP cand_2 ... SEP cand_k  SEP        ->   answer
    "47+08="  ;  "550" EOS  ;  "540" EOS  ...       ;          ->   "550" EOS

(`fuser_input`): the task prompt (which ends in "="), each candidate's T = 4 tokens (reversed sum digits, EOS),
a separator before each and one at the end; the fuser then generates the answer's 4 tokens. k is 1..16.

Candidates. Sampled at temperature 1 from the weak "tiny-early" model (the tiny recipe cut to 700 steps, about
10 % greedy accuracy, the generator the program benchmarks use), so the fuser sees the real error distribution
of the candidates it will be asked to fuse. Training uses the task's training operand pairs only; the task's
held-out pairs (tiny_task.is_held_out) are never seen, and all evaluation is on them.

Training is cached like tiny_task.load_or_train (lock file, json info, safetensors): `load_or_train_fuser()`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from examples.models.llama import Llama, LlamaConfig
from examples.models.tiny_task import (ANSWER_LEN, EOS, N_DIGITS, PROMPT_LEN, RECIPES, VOCAB_SIZE, encode,
                                       fit, is_held_out, load_or_train_cached, make_problems, recipe_hash,
                                       sample_operands, train_and_describe)
from lmforge.cache import cache_dir

SEP = VOCAB_SIZE                 # 14: the separator, the last id of the fuser's vocabulary
FUSER_VOCAB = VOCAB_SIZE + 1
MAX_CANDIDATES = 16
CANDIDATE_LEN = ANSWER_LEN       # candidates are whole answers: 3 reversed digits + EOS
MAX_SEQ = PROMPT_LEN + MAX_CANDIDATES * (CANDIDATE_LEN + 1) + 1 + ANSWER_LEN   # 91
EARLY_STEPS = 700                # the weak generator: the tiny recipe cut to 700 steps ("tiny-early")
FUSER_CONFIG = LlamaConfig(vocab_size=FUSER_VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192,
                           max_seq_len=96)

# Bump when the format, the candidate source or the trainer changes, so the cached fuser is retrained.
FUSER_VERSION = "fuser-task-v1"


@dataclass(frozen=True)
class FuserRecipe:
    steps: int = 1000
    batch_size: int = 64
    samples_per_pair: int = MAX_CANDIDATES   # candidate pool per training pair
    pool_pairs: int = 4096                   # training pairs with a sampled candidate pool
    ks: tuple = (1, 2, 4, 8, 16)             # how many candidates an example shows (one k per batch)
    seed: int = 0
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01


RECIPE = FuserRecipe()


# ---- format -----------------------------------------------------------------------------------------

def fuser_input(prompts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """prompts [n, L] and candidates [n, k, T] -> the fuser's input [n, L + k (T + 1) + 1] (module docstring)."""
    n, k, T = candidates.shape
    sep = torch.full((n, k, 1), SEP, dtype=torch.long)
    body = torch.cat((sep, candidates), dim=2).reshape(n, k * (T + 1))
    return torch.cat((prompts, body, torch.full((n, 1), SEP, dtype=torch.long)), dim=1)


# ---- candidates -------------------------------------------------------------------------------------

def weak_generator() -> Llama:
    """"tiny-early": the task's tiny recipe cut to EARLY_STEPS (cached next to the task models)."""
    config, recipe = LlamaConfig.preset("tiny"), replace(RECIPES["tiny"], steps=EARLY_STEPS)
    stem = cache_dir("models") / f"tiny_task-{recipe_hash(config, recipe)}"
    return load_or_train_cached(config, stem, lambda: train_and_describe(config, recipe))


@torch.no_grad()
def sample_answers(model: Llama, prompts: torch.Tensor, samples: int, generator: torch.Generator,
                   temperature: float = 1.0, chunk: int = 8192) -> torch.Tensor:
    """`samples` sampled answers per prompt [n, L] from `model`: [n, samples, ANSWER_LEN] (EOS-padded after EOS)."""
    rows = prompts.repeat_interleave(samples, 0)
    out = []
    for start in range(0, len(rows), chunk):
        seq = rows[start:start + chunk]
        for _ in range(ANSWER_LEN):
            probs = (model(seq)[:, -1].float() / temperature).softmax(-1)
            seq = torch.cat((seq, torch.multinomial(probs, 1, generator=generator)), 1)
        ans = seq[:, prompts.shape[1]:]
        done = (ans == EOS).long().cumsum(1) - (ans == EOS).long() > 0   # after the first EOS
        out.append(ans.masked_fill(done, EOS))
    return torch.cat(out).reshape(len(prompts), samples, ANSWER_LEN)


# ---- training ---------------------------------------------------------------------------------------

def fuser_loss(model: Llama, inputs: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens, teacher-forced after the fuser input."""
    seq = torch.cat((inputs, answers[:, :-1]), 1)
    logits = model(seq)[:, inputs.shape[1] - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))


def train_fuser(recipe: FuserRecipe = RECIPE, generator_model: Llama | None = None) -> Llama:
    """Sample a candidate pool from the weak generator on training pairs, then train the fuser on it."""
    gen = torch.Generator().manual_seed(recipe.seed)
    a, b = sample_operands(recipe.pool_pairs, gen, "train")
    assert not is_held_out(a, b).any()
    prompts, answers = encode(a, b)
    pool = sample_answers(generator_model or weak_generator(), prompts, recipe.samples_per_pair, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Llama(FUSER_CONFIG)

    def loss_at(step: int) -> torch.Tensor:
        k = recipe.ks[step % len(recipe.ks)]
        idx = torch.randint(0, len(prompts), (recipe.batch_size,), generator=gen)
        pick = torch.rand(recipe.batch_size, recipe.samples_per_pair, generator=gen).argsort(1)[:, :k]
        cands = pool[idx[:, None], pick]
        return fuser_loss(model, fuser_input(prompts[idx], cands), answers[idx])

    return fit(model, recipe, loss_at)


# ---- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def fuse_greedy(model: Llama, prompts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The fuser's greedy answers [n, ANSWER_LEN] for prompts [n, L] and candidates [n, k, T] (eager, batched)."""
    seq = fuser_input(prompts, candidates)
    start = seq.shape[1]
    for _ in range(ANSWER_LEN):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    return seq[:, start:]


def heldout_fuse_accuracy(model: Llama, k: int, n: int = 512, seed: int = 99,
                          generator_model: Llama | None = None) -> dict:
    """On n held-out problems with k weak candidates each: the fuser's accuracy, the candidates' majority vote's,
    and how often the right answer is among the candidates (an oracle verifier's accuracy)."""
    prompts, answers = make_problems(n, seed, split="heldout")
    cands = sample_answers(generator_model or weak_generator(), prompts, k, torch.Generator().manual_seed(seed))
    fused = fuse_greedy(model, prompts, cands)
    right = (cands == answers[:, None]).all(-1)
    vote = torch.stack([majority(c) for c in cands])
    return {"fuser": float((fused == answers).all(1).float().mean()),
            "majority_vote": float((vote == answers).all(1).float().mean()),
            "oracle": float(right.any(1).float().mean())}


def majority(candidates: torch.Tensor) -> torch.Tensor:
    """The most frequent row of candidates [k, T] (ties: the earliest)."""
    rows = [tuple(r) for r in candidates.tolist()]
    return torch.tensor(max(rows, key=lambda r: (rows.count(r), -rows.index(r))))


# ---- cache ------------------------------------------------------------------------------------------

def fuser_hash(recipe: FuserRecipe = RECIPE) -> str:
    early = recipe_hash(LlamaConfig.preset("tiny"), replace(RECIPES["tiny"], steps=EARLY_STEPS))
    blob = json.dumps({"config": FUSER_CONFIG.to_dict(), "recipe": asdict(recipe), "version": FUSER_VERSION,
                       "generator": early, "digits": N_DIGITS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train_fuser(recipe: FuserRecipe = RECIPE) -> Llama:
    """The trained fuser from cache_dir("models") (fuser_task-<hash>.safetensors/.json), else trained and cached.
    Concurrent first callers train once (a lock file), like tiny_task.load_or_train."""
    stem = cache_dir("models") / f"fuser_task-{fuser_hash(recipe)}"
    return load_or_train_cached(FUSER_CONFIG, stem, lambda: _train_and_describe(recipe))


def _train_and_describe(recipe: FuserRecipe) -> tuple[Llama, dict]:
    start = time.perf_counter()
    model = train_fuser(recipe)
    seconds = time.perf_counter() - start
    info = {"config": FUSER_CONFIG.to_dict(), "recipe": asdict(recipe), "version": FUSER_VERSION,
            "train_seconds": round(seconds, 2), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "heldout_k8_512": heldout_fuse_accuracy(model, 8)}
    return model, info
