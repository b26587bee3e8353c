"""rlcourse: reinforcement learning for language models, as a textbook you can run.

Layers (imports point downward only; :data:`LAYERS` is the same table as code, and
``tests/test_layers.py`` checks both this list and every import against it):

0. foundation: :mod:`rlcourse.config`, :mod:`rlcourse.files`
1. pure math: :mod:`rlcourse.mdp`, :mod:`rlcourse.rl`, :mod:`rlcourse.losses`,
   :mod:`rlcourse.critic_free`, :mod:`rlcourse.bandit`, :mod:`rlcourse.memory`,
   :mod:`rlcourse.precision`,
   :mod:`rlcourse.verifiers`
2. models, data and guards: :mod:`rlcourse.models`, :mod:`rlcourse.data`,
   :mod:`rlcourse.adapters`, :mod:`rlcourse.guards`
3. engines: :mod:`rlcourse.engine`, :mod:`rlcourse.ppo`, :mod:`rlcourse.grpo`,
   :mod:`rlcourse.preference`, :mod:`rlcourse.reward_model`, :mod:`rlcourse.online`,
   :mod:`rlcourse.recipes` (a package: typed, schema, load, registry, offline_methods,
   rl_methods, round_methods, rewards, output, checks, run, reference, cli)
4. worlds and evaluation: :mod:`rlcourse.worlds`, :mod:`rlcourse.evaluation`
5. teaching aids and book tooling: :mod:`rlcourse.teaching`, :mod:`rlcourse.exercises`,
   :mod:`rlcourse.notebooks`, :mod:`rlcourse.book`, :mod:`rlcourse.site`

Submodules are imported on demand, so ``import rlcourse`` stays cheap.
"""

from rlcourse.config import DATA_DIR, REPO_ROOT, is_quick, pick, seed_everything

__version__ = "0.1.0"
__all__ = ["DATA_DIR", "LAYERS", "REPO_ROOT", "is_quick", "pick", "seed_everything",
           "__version__"]

#: Layer -> the top-level modules and packages in it (a package's submodules share its layer).
#: A module may import from its own layer or a lower one, never from a higher one.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("config", "files"),
    1: ("mdp", "rl", "losses", "critic_free", "bandit", "memory", "precision",
        "verifiers"),
    2: ("models", "data", "adapters", "guards"),
    3: ("engine", "ppo", "grpo", "preference", "reward_model", "online", "recipes"),
    4: ("worlds", "evaluation"),
    5: ("teaching", "exercises", "notebooks", "book", "site"),
}
