import argparse

import pytest

from mops_core.config import CONCERNS, MoPsConfig, Settings, TrainConfig
from mops_core.settings import SettingsError, add_cli_flags, build, cli_values


def test_kebab_and_snake_keys_and_string_values_are_coerced():
    s = Settings.from_flat({"prompts-per-expert": "5", "inject_layer": 4, "lr": "0.01", "dataset": "sni"})
    assert s.mops.prompts_per_expert == 5 and s.mops.inject_layer == 4
    assert s.train.lr == 0.01 and s.data.dataset == "sni"
    assert Settings.from_flat(s.to_flat()) == s


@pytest.mark.parametrize(
    "values, message",
    [
        ({"promts-per-expert": 3}, "unknown setting 'promts-per-expert'; did you mean 'prompts-per-expert'"),
        ({"experts": "many"}, "setting 'experts': expected an integer, got 'many'"),
        ({"experts": 0}, "setting 'experts': must be at least 1"),
        ({"lr": -1}, "setting 'lr': must be a positive number"),
        ({"lr": True}, "setting 'lr': expected a number"),
        ({"gating": "softmax"}, "setting 'gating': must be one of 'attention', 'hidden', 'none'"),
        ({"test-fraction": 1.5}, "setting 'test-fraction': must be between 0 and 1"),
        ({"max-length": 8}, "setting 'max-length': must be at least 32"),
        ({"input-prompt-init": "text", "input-prompt-text": " "}, "setting 'input-prompt-text': must hold some text"),
        ({"expert-aggregation": "tasks"}, "setting 'expert-aggregation': must be one of 'examples', 'gate'"),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_flat(values)
    assert message in str(err.value)


def test_cli_flags_map_onto_the_dataclasses():
    parser = argparse.ArgumentParser()
    for cls in CONCERNS.values():
        add_cli_flags(parser, cls)
    args = parser.parse_args(["--experts", "4", "--method", "prompt", "--steps", "12"])
    assert build(MoPsConfig, cli_values(args, MoPsConfig)) == MoPsConfig(experts=4, method="prompt")
    assert build(TrainConfig, cli_values(args, TrainConfig)).steps == 12


def test_replace_validates_again():
    s = Settings()
    assert s.replace(steps=5).train.steps == 5
    with pytest.raises(SettingsError, match="setting 'steps'"):
        s.replace(steps=-1)


def test_pyproject_run_config_is_the_defaults_with_the_demos_changes_on_top():
    import tomllib
    from pathlib import Path

    from mops_core.config import DEMO

    table = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    run_config = table["tool"]["flwr"]["app"]["config"]
    expected = {**Settings().to_flat(), **DEMO}
    assert set(run_config) == set(expected), "pyproject.toml and mops_core.config disagree on the keys"
    wrong = {k: (v, expected[k]) for k, v in run_config.items() if v != expected[k] or type(v) is not type(expected[k])}
    assert not wrong, f"pyproject.toml differs from the defaults + DEMO at (pyproject, expected): {wrong}"
    settings = Settings.from_flat(run_config, context="pyproject.toml")
    assert settings.federated.fraction_train * settings.federated.min_available_nodes == 10  # 10 of 100 per round


def test_docs_settings_md_is_generated_from_the_code():
    from pathlib import Path

    from mops_core.config import settings_markdown

    written = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    assert written == settings_markdown(), "docs/settings.md is stale: run `make settings-doc`"


def test_every_setting_says_what_it_is_for():
    from mops_core.settings import describe

    missing = [key for _, key, _, _, help_text in describe(CONCERNS) if len(help_text) < 20]
    assert not missing, f"settings without a purpose in their help text: {missing}"
