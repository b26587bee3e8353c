import sys

from rlcourse.exercises.cli import main

sys.exit(main())
