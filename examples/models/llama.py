"""A small Llama-style decoder written out in plain PyTorch, shaped for torch.export.

Why it exists: lmforge needs a real LLM to capture, compile and tune, with a KV cache whose shapes
torch.export can keep symbolic. The model follows the Llama recipe (RMSNorm, rotary position
embeddings in rotate-half form, grouped-query attention, SwiGLU MLP, untied LM head) and has no
data-dependent Python control flow, so prefill and the decode step each export with dynamic batch,
sequence and cache length.

The KV cache is two stacked tensors, `k_cache` and `v_cache`, each of shape
`[n_layers, batch, n_kv_heads, T, head_dim]` (T may be 0). Every call is functional: it returns new
caches grown along T with `torch.cat` instead of writing into a preallocated buffer.

    cfg = LlamaConfig.preset("5m")
    model = Llama(cfg).eval()
    logits, k, v = model.prefill(prompt)                 # prompt [B, L]
    logits, k, v = model.decode_step(next_tok, k, v)     # next_tok [B, 1]
    ids = greedy_generate(LlamaDecodeStep(model), prompt, 8, empty_cache=cfg.empty_cache)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError

# name -> keyword arguments of LlamaConfig. "tiny" is the model trained on the addition task
# (examples/models/tiny_task.py, whose 14-token vocabulary it uses); the others only ever get random weights.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=14, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=16),
    # "small" is trained on the same task (about 3.5 minutes on 2 cores: benchmarks only, never in CI); its
    # 128-wide layers admit int4 with group size 128
    "small": dict(vocab_size=14, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=16),
    "5m": dict(vocab_size=4096, dim=256, n_layers=5, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=512),
    "100m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=2048),
}


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-style decoder. head_dim is dim // n_heads."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise LmforgeError(
                f"LlamaConfig needs dim divisible by n_heads, n_heads divisible by n_kv_heads and an even "
                f"head_dim; got dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A named configuration from PRESETS ("tiny", "5m", "100m"), optionally with fields overridden."""
        if name not in PRESETS:
            raise LmforgeError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self) -> int:
        """Number of parameters of Llama(self), counted from the shapes (no model is built)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2   # wq, wo, wk, wv
        mlp = 3 * self.dim * self.ffn_dim                                # w1, w3, w2
        per_layer = attention + mlp + 2 * self.dim                       # two RMSNorm weights
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim  # embed, head, final norm

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32, device=None):
        """The (k_cache, v_cache) pair with T = 0 that a first decode step starts from."""
        shape = (self.n_layers, batch, self.n_kv_heads, 0, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dimension (the rotate-half form of RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key heads x [B, H, S, D] by their positions' angles (cos, sin: [S, D])."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, past_k=None, past_v=None):
        """x [B, S, dim] -> (out [B, S, dim], k [B, KV, T+S, D], v [B, KV, T+S, D]).

        Without a past (prefill) the attention is causal over the S new tokens. With a past the call
        is a decode step (S == 1): the one new query may look at every cached position, so no mask.
        """
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_k is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.wo(out), k, v


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, past_k=None, past_v=None):
        attn, k, v = self.attention(self.attention_norm(x), cos, sin, past_k, past_v)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h)), k, v


class Llama(nn.Module):
    """The decoder. Call `forward` (logits only), `prefill` or `decode_step`; see the module docstring."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled down by sqrt(2 * n_layers)."""
        residual_std = 0.02 / (2 * self.config.n_layers) ** 0.5
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=0.02)

    def rope_tables(self, past_len, seq_len: int, dtype: torch.dtype):
        """cos, sin [S, head_dim] for positions past_len + arange(S), computed from inv_freq at run time."""
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32) + past_len
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if dtype != torch.float32:  # angles stay fp32 for accuracy; only the tables are cast
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def _run(self, tokens, k_cache=None, v_cache=None):
        """Shared body of prefill and decode_step; returns logits and the stacked full caches."""
        x = self.tok_embeddings(tokens)
        past_len = 0 if k_cache is None else k_cache.shape[3]
        cos, sin = self.rope_tables(past_len, tokens.shape[1], x.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            past_k = None if k_cache is None else k_cache[i]
            past_v = None if v_cache is None else v_cache[i]
            x, k, v = layer(x, cos, sin, past_k, past_v)
            new_k.append(k)
            new_v.append(v)
        logits = self.output(self.norm(x))
        return logits, torch.stack(new_k), torch.stack(new_v)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab], causal over the whole sequence, no cache."""
        return self._run(tokens)[0]

    def prefill(self, tokens: torch.Tensor):
        """tokens [B, S] -> (logits [B, S, V], k_cache, v_cache [n_layers, B, n_kv_heads, S, head_dim])."""
        return self._run(tokens)

    def decode_step(self, tokens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """tokens [B, 1] after T cached positions -> (logits [B, 1, V], caches grown to T + 1).

        One new token per sequence: the step attends without a causal mask (its one query may see every key),
        so several new tokens would see each other's future; prefill them, or feed them one step at a time.
        """
        if tokens.dim() != 2 or tokens.shape[1] != 1:   # a static size, also under torch.export
            raise LmforgeError(f"decode_step takes one new token per sequence (tokens [B, 1]), got tokens of shape "
                               f"{tuple(tokens.shape)}: its attention has no causal mask among new tokens; use "
                               "prefill for several tokens, or call decode_step once per token")
        return self._run(tokens, k_cache, v_cache)

    def empty_cache(self, batch: int):
        """T = 0 caches of this model's dtype and device."""
        weight = self.tok_embeddings.weight
        return self.config.empty_cache(batch, dtype=weight.dtype, device=weight.device)


class LlamaPrefill(nn.Module):
    """`forward(tokens) = model.prefill(tokens)`, so torch.export captures the prefill alone."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.prefill(tokens)


class LlamaDecodeStep(nn.Module):
    """`forward(tokens, k_cache, v_cache) = model.decode_step(...)`, so torch.export captures one step."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, tokens, k_cache, v_cache):
        return self.model.decode_step(tokens, k_cache, v_cache)

    def empty_cache(self, batch: int):
        return self.model.empty_cache(batch)


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


@torch.no_grad()
def greedy_generate(step_fn: StepFn, prompt: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                    *, empty_cache: Callable[[int], tuple] | None = None) -> torch.Tensor:
    """Greedy decoding driven by a decode-step callable only: `step_fn(tok [B,1], k, v) -> (logits, k, v)`.

    The prompt [B, L] goes through step_fn one token at a time from an empty cache, then the argmax
    token is fed back until max_new_tokens are produced. Because nothing but the decode step is used,
    a compiled decode step can be evaluated end to end. `empty_cache(batch) -> (k, v)` makes the T = 0
    caches; by default `step_fn.empty_cache` (LlamaDecodeStep has one). Rows that have emitted eos_id
    keep emitting eos_id. Returns the generated ids [B, max_new_tokens].
    """
    make_cache = empty_cache or getattr(step_fn, "empty_cache", None)
    if make_cache is None:
        raise TypeError("greedy_generate needs empty_cache=... (e.g. LlamaConfig.empty_cache) for this step_fn")
    batch, prompt_len = prompt.shape
    k_cache, v_cache = make_cache(batch)
    logits = None
    for pos in range(prompt_len):
        logits, k_cache, v_cache = step_fn(prompt[:, pos:pos + 1], k_cache, v_cache)
    generated = torch.empty(batch, max_new_tokens, dtype=torch.long, device=prompt.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        next_tok = logits[:, -1, :].argmax(dim=-1)
        if eos_id is not None:
            next_tok = torch.where(finished, torch.full_like(next_tok, eos_id), next_tok)
            finished |= next_tok == eos_id
        generated[:, step] = next_tok
        if step + 1 < max_new_tokens:
            logits, k_cache, v_cache = step_fn(next_tok[:, None], k_cache, v_cache)
    return generated
