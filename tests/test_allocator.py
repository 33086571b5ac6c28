"""The malloc settings are applied on Linux/glibc and left alone when the user chose."""

from __future__ import annotations

import platform
import sys

import pytest

from alignkit.engine.allocator import tune_malloc, user_chose


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"ALIGNKIT_MALLOC": "default"}])
def test_a_user_choice_is_left_alone(env):
    assert user_chose(env)
    assert tune_malloc(env) is False


def test_nothing_chosen_means_tuned_on_glibc():
    assert not user_chose({"ALIGNKIT_MALLOC": "tuned", "PATH": "/bin"})
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_malloc({}) is glibc
