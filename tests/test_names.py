"""ivtp.names restates a few names for the torch-free CLI parser; these tests keep them in step with the modules
that own what they name."""

from ivtp import names
from ivtp.eval import bench
from ivtp.models import DTYPES, PRESETS, load_model
from ivtp.testbed.ablate import plan_rows


def test_preset_names_are_the_presets_in_order():
    assert names.PRESET_NAMES == tuple(PRESETS)
    assert not set(names.MODEL_ALIASES) & set(PRESETS)


def test_every_suite_name_plans_rows_of_that_suite():
    for suite in names.SUITES:
        rows = plan_rows((suite,), names.DEFAULT_BUDGETS, "/x/aligner.safetensors", 6, retrained=True)
        assert rows and {r.suite for r in rows} == {suite}, suite


def test_dtype_and_allocator_names_resolve():
    assert set(DTYPES) == set(names.DTYPE_NAMES) and all(DTYPES[n].is_floating_point for n in DTYPES)
    assert bench.ALLOCATORS is names.ALLOCATORS


def test_the_testbed_alias_loads_the_shipped_model():
    model, _ = load_model(names.MODEL_ALIASES[0])
    assert model.config._name_or_path.rstrip("/") == names.TESTBED_MODEL.rstrip("/")
