"""lmpg_utils: the package behind the book *Large Language Models from Theory to Practice: Policy Gradient*.

Notebooks narrate; this package does the work. Imports go down the layers only:

- infrastructure: ``runtime`` (device, profile, threads, seeds, resolved once at the
  edge), ``distributed`` (data-parallel training under ``torchrun``), ``configs`` (the
  experiment contract and ``--set``), ``caching``, ``corpora``, ``tokenization``,
  ``training``, ``metrics``;
- models: ``attention``, ``transformer``, ``neural_lm``, ``ngram``, ``generation``;
- tasks and methods: ``language_modeling`` (chapters 1-2's data, batching, perplexity
  and cached GPT), ``bert`` (a subpackage: ``bert.masking``, ``bert.data``,
  ``bert.model``, ``bert.training``, ``bert.evaluation``, ``bert.book_groups``,
  ``bert.pretrained``), ``translation`` (chapter 4's task: data, tokenizer, cached MLE
  start, evaluation), ``judges`` (chapter 5's book-group classifiers, the learned
  reward), ``rlhf`` (chapter 5's task, methods, evaluation and controls) and
  ``policy_gradient`` (estimators, losses, rollouts, the update loop);
- ``experiments``: one module per chapter, each with the same names (``NAME``,
  ``Config``, ``PROFILES``, ``run``, ``Result``), none importing another;
- the command line, ``python -m lmpg_utils`` (README's layout section maps chapters to
  modules).
"""

__version__ = "0.1.0"
