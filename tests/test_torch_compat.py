"""Torch internals are used only within the releases they were written for: outside them the first
use says which range is supported (unless the user opts in), instead of an AttributeError deep in
a run."""

from __future__ import annotations

import pytest
import torch

from elastic_resume import _torch_compat
from elastic_resume.errors import UnsupportedVersionError


@pytest.fixture
def torch_version(monkeypatch):
    def set_version(version: str) -> None:
        monkeypatch.setattr(torch, "__version__", version)
        _torch_compat.require.cache_clear()

    yield set_version
    _torch_compat.require.cache_clear()


def test_a_torch_outside_the_supported_range_is_refused_naming_the_range(torch_version, monkeypatch):
    monkeypatch.delenv("ER_ALLOW_UNSUPPORTED_TORCH", raising=False)
    torch_version("2.99.0")
    with pytest.raises(UnsupportedVersionError, match=r"elastic-resume launch relies on torch internals written for "
                                                      r"torch >=2\.13,<2\.15; this is torch 2\.99\.0"):
        _torch_compat.launcher_api()
    assert isinstance(UnsupportedVersionError("x"), ImportError)


def test_the_user_may_opt_in_to_an_untested_torch(torch_version, monkeypatch):
    monkeypatch.setenv("ER_ALLOW_UNSUPPORTED_TORCH", "1")
    torch_version("2.99.0")
    assert _torch_compat.launcher_api().get_args_parser() is not None


def test_the_installed_torch_is_supported(torch_version):
    torch_version(torch.__version__)
    _torch_compat.require("anything")
    assert _torch_compat.SUPPORTED[0] <= _torch_compat._version_tuple(torch.__version__) < _torch_compat.SUPPORTED[1]
