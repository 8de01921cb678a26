"""A study's config is StudyConfig (RunConfig before 0.2, beside Run, RunSpec and run_id, which are
one run); the old names still resolve, with a DeprecationWarning that names the new one."""

import pytest

import cellscale
from cellscale import config


@pytest.mark.parametrize(("old", "new"), [("RunConfig", "StudyConfig"), ("load_run_config", "load_study_config")])
def test_old_names_resolve_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=f"cellscale.config.{old} is deprecated: use {new}"):
        assert getattr(config, old) is getattr(config, new)
    assert old not in cellscale.__all__ and new in cellscale.__all__


def test_package_root_gives_the_old_name_the_new_object():
    with pytest.warns(DeprecationWarning):
        assert cellscale.__getattr__("RunConfig") is config.StudyConfig


def test_unknown_config_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchConfig'"):
        config.NoSuchConfig  # noqa: B018
