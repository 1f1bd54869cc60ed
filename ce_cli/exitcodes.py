"""Process exit codes, documented in the README and in `ce-check --help`."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1
    USAGE_OR_INPUT_ERROR = 2
    INTERNAL_ERROR = 3
