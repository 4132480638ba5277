"""BERT's two pre-training objectives, the small BERT model, and fine-tuning (chapter 3).

The parts, from the bottom up (each name below is also importable from here):

* :mod:`~lmpg_utils.bert.masking`: special token ids and the masked-LM corruption,
  :func:`mask_tokens` (15% of the ordinary tokens chosen; of those 80% ``[MASK]``, 10%
  a random token, 10% unchanged).
* :mod:`~lmpg_utils.bert.data`: next-sentence and sentence-order pairs, their encoding
  ``[CLS] A [SEP] B [SEP]`` with segment ids and BERT's truncation, and batching.
* :mod:`~lmpg_utils.bert.model`: :class:`BertModel` (the shared Transformer encoder with
  an MLM head tied to the token embeddings and an NSP head on the pooled ``[CLS]``)
  and :class:`BertClassifier`.
* :mod:`~lmpg_utils.bert.training`: the pre-training loss and loop, and fine-tuning.
* :mod:`~lmpg_utils.bert.evaluation`: MLM/NSP accuracy against trivial baselines,
  classifier accuracy.
* :mod:`~lmpg_utils.bert.book_groups`: the book-group classification task.
* :mod:`~lmpg_utils.bert.pretrained`: the pre-training settings of each profile
  (:data:`PRETRAINING`), the chapter's tokenizer and its cached pre-trained model
  (:func:`load_pretrained`, which later chapters call).
"""

from .book_groups import (
    BOOK_GROUPS,
    balanced_prefix,
    book_group_of,
    classification_split,
)
from .data import (
    NEGATIVE_KINDS,
    ROUND_SEED_STEP,
    SENTENCE_TASKS,
    EncodedBatch,
    SentencePair,
    VerseLike,
    encode_nsp,
    encode_pairs,
    encode_single,
    make_nsp_pairs,
    pretraining_pairs,
    sentence_order_pairs,
    shuffled_batches,
    tokenize_texts,
    truncate_pair,
)
from .evaluation import (
    MLM_KINDS,
    classifier_accuracy,
    evaluate_pretraining,
    masked_targets,
    most_frequent_token,
)
from .masking import (
    IGNORE_INDEX,
    KEPT,
    MASKED,
    NOT_CHOSEN,
    RANDOM,
    MaskedTokens,
    SpecialIds,
    check_known_ids,
    mask_tokens,
    masking_statistics,
)
from .model import BertClassifier, BertModel
from .pretrained import (
    CACHE_KIND,
    PRETRAINING,
    PretrainedBert,
    Pretraining,
    load_pretrained,
    pretraining_data,
    tokenizer_hash,
    train_bible_tokenizer,
)
from .training import (
    PretrainHistory,
    PretrainingBatch,
    fine_tune,
    make_pretraining_batch,
    nsp_targets,
    pretrain,
    pretraining_loss,
    train_classifier,
)

__all__ = [
    "BOOK_GROUPS",
    "CACHE_KIND",
    "IGNORE_INDEX",
    "KEPT",
    "MASKED",
    "MLM_KINDS",
    "NEGATIVE_KINDS",
    "NOT_CHOSEN",
    "PRETRAINING",
    "RANDOM",
    "ROUND_SEED_STEP",
    "SENTENCE_TASKS",
    "BertClassifier",
    "BertModel",
    "EncodedBatch",
    "MaskedTokens",
    "PretrainHistory",
    "PretrainedBert",
    "Pretraining",
    "PretrainingBatch",
    "SentencePair",
    "SpecialIds",
    "VerseLike",
    "balanced_prefix",
    "book_group_of",
    "check_known_ids",
    "classification_split",
    "classifier_accuracy",
    "encode_nsp",
    "encode_pairs",
    "encode_single",
    "evaluate_pretraining",
    "fine_tune",
    "load_pretrained",
    "make_nsp_pairs",
    "make_pretraining_batch",
    "mask_tokens",
    "masked_targets",
    "masking_statistics",
    "most_frequent_token",
    "nsp_targets",
    "pretrain",
    "pretraining_data",
    "pretraining_loss",
    "pretraining_pairs",
    "sentence_order_pairs",
    "shuffled_batches",
    "tokenize_texts",
    "tokenizer_hash",
    "train_bible_tokenizer",
    "train_classifier",
    "truncate_pair",
]
