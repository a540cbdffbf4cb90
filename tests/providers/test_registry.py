"""`create_provider` picks a replica pool's provider by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from trunkline.providers import PROVIDERS, ProviderError, create_provider
from trunkline.providers.fake import FakeProvider
from trunkline.providers.local import LocalProvider


def test_local_is_built_with_its_run_dir(tmp_path: Path) -> None:
    """`provider = "local"` gives a LocalProvider over the given run dir."""
    p = create_provider("local", run_dir=tmp_path)
    assert isinstance(p, LocalProvider)
    assert (p.name, p.run_dir) == ("local", tmp_path)


def test_an_unknown_name_or_setting_is_refused_with_the_known_names() -> None:
    """An unknown provider names the known ones; an unknown setting names itself."""
    with pytest.raises(
        ProviderError,
        match=r"unknown replica provider 'k8s'; known providers: 'kubernetes', 'local'",
    ):
        create_provider("k8s")
    with pytest.raises(ProviderError, match="namespace"):
        create_provider("local", run_dir="/tmp/x", namespace="default")


def test_a_test_can_bring_its_own_registry() -> None:
    """`registry=` lets a test wire a fake in by name."""
    p = create_provider("fake", registry={**PROVIDERS, "fake": FakeProvider})
    assert isinstance(p, FakeProvider)
