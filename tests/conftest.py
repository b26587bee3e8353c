import os

# Every test, and every notebook the tests execute, runs in quick mode.
os.environ.setdefault("RLCOURSE_QUICK", "1")
