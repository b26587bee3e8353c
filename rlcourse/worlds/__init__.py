"""Toy worlds the book's experiments live in.

- :mod:`rlcourse.worlds.assistant`: the assistant world of the small-GPT chapters (prompts,
  a sentence grammar, a hidden ground-truth judge, a simulated annotator, dataset generators).
- :mod:`rlcourse.worlds.reasoning`: arithmetic word problems with worked solutions (with
  slips) in GSM8K's format, an exact verifier and disjoint train/validation/test splits.
- :mod:`rlcourse.worlds.token_mdp`: the toy token MDP of the policy-gradient chapters.

Submodules are imported on demand.
"""
