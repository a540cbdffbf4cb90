"""The contract checks live outside test modules: have pytest rewrite their
asserts anyway, so a failing backend shows the values that differ."""

import pytest

pytest.register_assert_rewrite("stores.contract")
