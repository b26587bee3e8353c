"""Layer 5: teaching aids (source rendering, plots, widgets). Nothing below imports this."""

from rlcourse.teaching.show import show_source

__all__ = ["show_source"]
