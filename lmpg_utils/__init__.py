"""lmpg_utils: the package behind the book *Large Language Models from Theory to Practice: Policy Gradient*.

Notebooks narrate; this package does the work. One module per concept:
``runtime``, ``caching``, ``corpora``, ``tokenization``, ``ngram``, ``neural_lm``, ``attention``,
``transformer``, ``generation``, ``training``, ``metrics``, ``bert``, ``translation``,
``policy_gradient`` and ``experiments`` (one main run per chapter; README's layout
section maps chapters to modules).
"""

__version__ = "0.1.0"
