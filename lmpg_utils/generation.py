"""Batched decoding with a key/value cache: greedy, temperature and top-k sampling.

Chapter 2 samples text from the GPT with :func:`generate`; chapter 4 samples
translations with :func:`translate`, and scores them with
:func:`sequence_log_probs`, which recomputes log-probabilities with gradients in one
teacher-forced pass (cheaper than keeping the sampling graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .transformer import GPT, EncoderDecoder


def pick_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose next tokens from ``logits`` (B, V): greedy when ``temperature == 0``, else sample."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    if generator is not None and generator.device != probs.device:
        return (
            torch.multinomial(probs.cpu(), 1, generator=generator)
            .squeeze(-1)
            .to(probs.device)
        )
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each row of ``prompt`` (B, L) by ``max_new_tokens`` tokens; returns (B, L + new).

    With ``use_cache`` each step feeds only the newest token and reuses cached keys
    and values; without it each step re-runs the whole prefix (the slow reference).
    """
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty (batch, length) tensor, got shape {tuple(prompt.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt.shape[1] + max_new_tokens > model.config.max_len:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + {max_new_tokens} new tokens exceeds max_len {model.config.max_len}"
        )
    was_training = model.training
    model.eval()
    tokens = prompt
    cache = model.new_cache() if use_cache else None
    step_input = prompt
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache) if use_cache else model(tokens)
        next_token = pick_next(logits[:, -1], temperature, top_k, generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
    model.train(was_training)
    return tokens


def policy_logits(logits: Tensor, bos_id: int, pad_id: int) -> Tensor:
    """The translation policy's logits: ``logits`` with BOS and PAD forbidden (set to -inf).

    Padding and BOS are never valid outputs: a sampled PAD would end a row silently.
    :func:`translate` samples from these logits and :func:`sequence_log_probs` scores
    with them, so REINFORCE differentiates exactly the policy that drew the samples.
    Works on any shape whose last dimension is the vocabulary; returns a new tensor.
    """
    forbidden = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    forbidden[[bos_id, pad_id]] = True
    return logits.masked_fill(forbidden, float("-inf"))


@torch.no_grad()
def translate(
    model: EncoderDecoder,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_log_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode a batch of sources (B, S) into targets (B, T) starting with BOS.

    Greedy when ``temperature == 0``, else sampled. After a row emits EOS it is
    padded with ``pad_id``; decoding stops when every row has ended or after
    ``max_len`` tokens. Rows that never emit EOS end at ``max_len`` unterminated.

    With ``return_log_probs`` also returns, for every chosen token, its log-probability
    under the policy at decoding time, ``(B, T - 1)`` and 0 after a row's EOS: the
    policy is :func:`policy_logits` at temperature 1 (what :func:`sequence_log_probs`
    scores), so these are the "old" log-probs a clipped-ratio loss or a KL term needs.
    """
    if src.dim() != 2 or src.shape[0] == 0 or src.shape[1] == 0:
        raise ValueError(
            f"src must be a non-empty (batch, length) tensor, got shape {tuple(src.shape)}"
        )
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    empty = (src != pad_id).sum(dim=1) == 0
    if bool(empty.any()):
        raise ValueError(
            f"source rows {empty.nonzero().flatten().tolist()} are empty (all padding)"
        )
    was_training = model.training
    model.eval()
    src_padding_mask = src == pad_id
    memory = model.encode(src, src_padding_mask)
    cache = model.new_cache()
    batch = src.shape[0]
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    step_input = tokens
    chosen_log_probs = []
    for _ in range(max_len):
        logits = model.decode(step_input, memory, src_padding_mask, cache=cache)[:, -1]
        allowed = policy_logits(logits, bos_id, pad_id)
        next_token = pick_next(allowed, temperature, top_k, generator)
        if return_log_probs:
            step = F.log_softmax(allowed.float(), dim=-1)
            step = step.gather(-1, next_token[:, None]).squeeze(-1)
            chosen_log_probs.append(torch.where(finished, torch.zeros_like(step), step))
        next_token = torch.where(
            finished, torch.full_like(next_token, pad_id), next_token
        )
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token == eos_id
        step_input = next_token[:, None]
        if bool(finished.all()):
            break
    model.train(was_training)
    if return_log_probs:
        return tokens, torch.stack(chosen_log_probs, dim=1)
    return tokens


def target_mask(tokens: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Which positions of ``tokens[:, 1:]`` (after BOS) count: every token up to and including the first EOS."""
    out = tokens[:, 1:]
    is_eos = out == eos_id
    before_first_eos = (is_eos.cumsum(dim=1) - is_eos.long()) == 0
    return before_first_eos & (out != pad_id)


def sequence_log_probs(
    model: EncoderDecoder,
    src: Tensor,
    tokens: Tensor,
    eos_id: int,
    pad_id: int,
    bos_id: int | None = None,
    per_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-probability of each target sequence under the translation policy, with gradients.

    ``tokens`` (B, T) start with BOS (``bos_id``; default: read from ``tokens[0, 0]``).
    The policy is the one :func:`translate` samples from (:func:`policy_logits`: BOS
    and PAD forbidden). The sum runs over exactly the sampled tokens up to and
    including the first EOS (padding after it is excluded). Returns
    ``(log_prob (B,), token_count (B,))``; with ``per_token``, the terms of that sum
    instead: ``(log_probs (B, T - 1), mask (B, T - 1))``, 0 where the mask is False
    (what a per-token KL penalty or clipped-ratio loss needs).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(
            "tokens must be (batch, length >= 2) starting with BOS, "
            f"got shape {tuple(tokens.shape)}"
        )
    bos_id = int(tokens[0, 0]) if bos_id is None else bos_id
    logits = model(src, tokens[:, :-1], pad_id=pad_id)
    log_probs = F.log_softmax(policy_logits(logits.float(), bos_id, pad_id), dim=-1)
    chosen = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    mask = target_mask(tokens, eos_id, pad_id)
    # where, not a product: a PAD after EOS scores -inf under the policy, and 0 * -inf is nan
    terms = torch.where(mask, chosen, torch.zeros_like(chosen))
    if per_token:
        return terms, mask
    return terms.sum(dim=1), mask.sum(dim=1)


def forbid(logits: Tensor, token_ids: Sequence[int]) -> Tensor:
    """``logits`` with ``token_ids`` set to -inf on the last (vocabulary) dimension."""
    forbidden = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    forbidden[list(token_ids)] = True
    return logits.masked_fill(forbidden, float("-inf"))


def _check_prompts(model: GPT, prompts: Tensor, max_new_tokens: int) -> None:
    if prompts.dim() != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise ValueError(
            "prompts must be a non-empty (batch, length) tensor, "
            f"got shape {tuple(prompts.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompts.shape[1] + max_new_tokens > model.config.max_len:
        raise ValueError(
            f"prompt length {prompts.shape[1]} + {max_new_tokens} new tokens exceeds "
            f"max_len {model.config.max_len}"
        )


@torch.no_grad()
def sample_continuations(
    model: GPT,
    prompts: Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    forbidden: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample a continuation of each row of ``prompts`` (B, P) from the GPT's policy: its
    next-token distribution at temperature 1 with the ``forbidden`` ids (and ``pad_id``)
    removed, until EOS or ``max_new_tokens``, with a key/value cache.

    Returns ``(tokens, log_probs, mask)``, each (B, T): the sampled ids (``pad_id``
    after a row's EOS), the log-probability each had when it was drawn, and True up to
    and including the first EOS. A row that never draws EOS ends after
    ``max_new_tokens`` tokens. :func:`continuation_log_probs` scores the same policy.
    """
    _check_prompts(model, prompts, max_new_tokens)
    removed = sorted({*forbidden, pad_id})
    was_training = model.training
    model.eval()
    cache = model.new_cache()
    step_input = prompts
    finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    tokens, log_probs, masks = [], [], []
    for _ in range(max_new_tokens):
        logits = forbid(model(step_input, cache=cache)[:, -1].float(), removed)
        step_log_probs = F.log_softmax(logits, dim=-1)
        chosen = pick_next(logits, 1.0, None, generator)
        masks.append(~finished)
        tokens.append(torch.where(finished, torch.full_like(chosen, pad_id), chosen))
        log_probs.append(
            torch.where(
                finished,
                torch.zeros_like(step_log_probs[:, 0]),
                step_log_probs.gather(-1, chosen[:, None]).squeeze(-1),
            )
        )
        finished = finished | (chosen == eos_id)
        step_input = chosen[:, None]
        if bool(finished.all()):
            break
    model.train(was_training)
    return torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


def continuation_log_probs(
    model: GPT,
    prompts: Tensor,
    tokens: Tensor,
    mask: Tensor,
    pad_id: int,
    forbidden: Sequence[int] = (),
) -> Tensor:
    """Per-token log-probabilities (B, T) of continuations ``tokens`` after ``prompts``
    under the policy :func:`sample_continuations` draws from, in one teacher-forced pass
    with gradients; 0 where ``mask`` is False."""
    if tokens.shape != mask.shape or tokens.shape[0] != prompts.shape[0]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)}, mask {tuple(mask.shape)} and prompts "
            f"{tuple(prompts.shape)} do not fit together"
        )
    sequence = torch.cat([prompts, tokens], dim=1)[:, :-1]
    logits = model(sequence)[:, prompts.shape[1] - 1 :].float()
    log_probs = F.log_softmax(forbid(logits, sorted({*forbidden, pad_id})), dim=-1)
    chosen = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    # where, not a product: PAD after EOS scores -inf, and 0 * -inf is nan
    return torch.where(mask, chosen, torch.zeros_like(chosen))
