"""rlcourse: reinforcement learning for language models, as a textbook you can run.

Layers (imports point downward only):

1. pure math: :mod:`rlcourse.mdp`, :mod:`rlcourse.rl`, :mod:`rlcourse.losses`
2. models and data: :mod:`rlcourse.models`, :mod:`rlcourse.data`
3. engines: :mod:`rlcourse.engine`, :mod:`rlcourse.ppo`, :mod:`rlcourse.preference`
4. worlds and evaluation: :mod:`rlcourse.worlds`, :mod:`rlcourse.evaluation`
5. teaching aids: :mod:`rlcourse.teaching`, :mod:`rlcourse.exercises`

Submodules are imported on demand, so ``import rlcourse`` stays cheap.
"""

from rlcourse.config import DATA_DIR, REPO_ROOT, is_quick, pick, seed_everything

__version__ = "0.1.0"
__all__ = ["DATA_DIR", "REPO_ROOT", "is_quick", "pick", "seed_everything", "__version__"]
