"""Long fuzzing run of tests/test_fuzz.py: `python bench/fuzz.py [EXAMPLES]` (default 300 per
test, random seeds). The normal test run uses a few derandomized examples per test."""

import os
import subprocess
import sys

n = sys.argv[1] if len(sys.argv) > 1 else "300"
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_fuzz.py"],
                         env={**os.environ, "CE_CHECK_FUZZ_EXAMPLES": n}))
