"""The closed form of Kinetics (Infini-AI-Lab; Sadhukhan et al., "Kinetics: Rethinking Test-Time Scaling
Laws", 2025) for best-of-N generation, and its per-token form.

Symbols: P parameters, N samples, L_in prompt tokens, L_out generated tokens per sample,
r = query heads / KV heads (GQA ratio), D = 2 x layers x KV heads x head_dim (K and V elements per token),
I = peak FLOP/s / memory bandwidth (FLOPs per byte). Over the whole generation:

    compute = 2 N P L_out + 2 r N L_in D L_out + r N D L_out^2
    memory  = 2 L_in D L_out + N D L_out^2          (the prompt's KV is shared by the N samples)
    eFLOPs  = compute + I x memory

The factors of 2: 2 FLOPs per multiply-add, and 2 bytes per KV element (16-bit cache). Parameter reads are
not in `memory`: at the batch sizes Kinetics studies they are amortized (add them yourself if not).

Per-token convention (`decode_step_cost`): at generated token t = 1..L_out every sample attends over the
L_in prompt tokens and over a generated KV of length (t - 1/2), the mean of its length before (t - 1) and
after (t) the token is appended. This is the convention under which the per-step costs sum exactly to the
closed form: sum_{t=1..L_out} (t - 1/2) = L_out^2 / 2. So step t costs

    compute_t = 2 N P + 2 r N L_in D + 2 r N D (t - 1/2)
    memory_t  = 2 L_in D + 2 N D (t - 1/2)
"""
from __future__ import annotations


def kinetics_best_of_n(P: float, N: float, L_in: float, L_out: float, r: float, D: float, I: float) -> dict:
    """Compute (FLOPs), memory (bytes) and eFLOPs of best-of-N generation (closed form, see module doc)."""
    compute = 2 * N * P * L_out + 2 * r * N * L_in * D * L_out + r * N * D * L_out ** 2
    memory = 2 * L_in * D * L_out + N * D * L_out ** 2
    return {"compute": compute, "memory": memory, "eflops": compute + I * memory}


def decode_step_cost(P: float, N: float, L_in: float, t: int, r: float, D: float, I: float) -> dict:
    """Compute, memory and eFLOPs of generated token t (1-based) for all N samples; summed over
    t = 1..L_out this equals `kinetics_best_of_n` (KV-length convention in the module docstring)."""
    if t < 1:
        raise ValueError(f"decode step t counts from 1 (the first generated token), got {t}")
    kv_generated = t - 0.5
    compute = 2 * N * P + 2 * r * N * L_in * D + 2 * r * N * D * kv_generated
    memory = 2 * L_in * D + 2 * N * D * kv_generated
    return {"compute": compute, "memory": memory, "eflops": compute + I * memory}


def model_dims(layers: int, kv_heads: int, head_dim: int, q_heads: int) -> tuple[float, float]:
    """(r, D) of a transformer: r = q_heads / kv_heads, D = 2 x layers x kv_heads x head_dim."""
    return q_heads / kv_heads, 2.0 * layers * kv_heads * head_dim
