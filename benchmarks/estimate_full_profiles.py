"""Estimate each chapter's ``full``-profile training time on a Colab T4, from FLOPs.

Not a measurement: no GPU was available while this was written. Each chapter's main
training run is counted as 6 FLOPs per parameter per token (forward and backward),
plus 12·L·T·d per token for a Transformer's attention scores at context T; embedding
lookups are free, a tied output projection is counted. Tokens come from the profile's
step budget and the corpus' measured mean verse length. The estimate divides by a T4's
peak times an assumed utilization, stated below, in fp32 and in fp16 autocast (the T4
has fp16 tensor cores but no bf16 ones). Run: ``python benchmarks/estimate_full_profiles.py``.
"""

from __future__ import annotations

import statistics

import torch

from lmpg_utils import corpora
from lmpg_utils.bert import BertModel
from lmpg_utils.experiments import (
    ch1_language_models,
    ch2_gpt,
    ch3_bert,
    ch4_policy_gradient,
)
from lmpg_utils.neural_lm import BidirectionalLSTMCloze, LSTMLanguageModel
from lmpg_utils.tokenization import word_tokenize
from lmpg_utils.transformer import GPT, EncoderDecoder

T4_PEAK = {"fp32": 8.1e12, "fp16": 65e12}  # NVIDIA's datasheet, FLOP/s
UTILIZATION = {"fp32": 0.35, "fp16": 0.25}  # assumed share of peak a small model gets


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix product per token: all but the input
    embedding tables, whose lookup costs nothing (a tied output head still counts)."""
    lookup = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            tied = any(
                p is module.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
                for p in m.parameters()
            )  # fmt: skip
            lookup += 0 if tied else module.weight.numel()
    return sum(p.numel() for p in model.parameters()) - lookup


def main() -> None:
    verses = [v.text for v in corpora.load_bible_verses() if v.split == "train"]
    framed = statistics.mean(len(word_tokenize(t)) for t in verses) + 2
    print(f"mean framed verse: {framed:.1f} words")
    rows = []
    lm = ch1_language_models.PROFILES["full"]
    with torch.device("meta"):
        lstm = LSTMLanguageModel(
            lm.vocab_size, lm.model.d_embed, lm.model.d_hidden, dropout=lm.model.dropout
        )
        cloze = BidirectionalLSTMCloze(
            lm.vocab_size, lm.model.d_embed, lm.model.d_hidden, dropout=lm.model.dropout
        )
    tokens = lm.batch_size * framed
    rows.append(("1 LSTM", lstm, lm.lstm_steps * tokens, 0.0))
    rows.append(("1 cloze", cloze, lm.cloze_steps * tokens, 0.0))

    gpt = ch2_gpt.PROFILES["full"]
    sizes = gpt.gpt.model
    with torch.device("meta"):
        model = GPT(sizes.with_vocab(gpt.vocab_size))
    attention = 12 * sizes.num_layers * framed * sizes.d_model
    rows.append(
        ("2 GPT", model, gpt.gpt.steps * gpt.gpt.batch_size * framed, attention)
    )

    bert_config = ch3_bert.PROFILES["full"]
    bert = bert_config.pretraining
    with torch.device("meta"):
        model = BertModel(bert.model_config())
    length = bert.model.max_len  # sentence pairs, padded to the longest in a batch
    attention = 12 * bert.model.num_layers * length * bert.model.d_model
    tokens = bert.steps * bert.batch_size * length
    rows.append(("3 BERT", model, tokens, attention))
    ablation = bert_config.ablation
    # every sentence task for every seed, less the chapter's own model (NSP, its seed)
    others = len(ablation.sentence_tasks) * ablation.seeds - 1
    rows.append((f"3 ablation x{others}", model, others * tokens, attention))

    pg = ch4_policy_gradient.PROFILES["full"]
    with torch.device("meta"):
        model = EncoderDecoder(pg.model.with_vocab(pg.vocab_size))
    # mle_batch_tokens padded target tokens a step; the sources are about as long and
    # pass through the encoder only, so count the whole model once per target token
    rows.append(("4 translator", model, pg.mle_steps * pg.mle_batch_tokens, 0.0))

    print(
        f"{'chapter':14s} {'params':>8s} {'tokens':>8s} {'FLOPs':>9s} "
        + " ".join(
            f"{'T4 ' + p + ' @' + format(UTILIZATION[p], '.0%'):>14s}" for p in T4_PEAK
        )
    )
    for name, model, tokens, attention in rows:
        flops = (6 * matmul_parameters(model) + attention) * tokens
        minutes = [flops / (T4_PEAK[p] * UTILIZATION[p]) / 60 for p in T4_PEAK]
        print(
            f"{name:14s} {sum(p.numel() for p in model.parameters()) / 1e6:7.1f}M "
            f"{tokens / 1e6:7.1f}M {flops:9.2e} "
            + " ".join(f"{m:10.1f} min" for m in minutes)
        )


if __name__ == "__main__":
    main()
