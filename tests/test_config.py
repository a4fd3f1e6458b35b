import pytest
import yaml

from compactify.config import REPO_ROOT, ConfigError, load_config


def test_defaults_and_override():
    cfg = load_config(None, {"seed": 7})
    assert cfg["seed"] == 7 and cfg["model"] == "embedded" and cfg["run_dir"] == "runs/default"


def test_typo_is_an_error_that_names_the_fix():
    with pytest.raises(ConfigError, match="Did you mean 'seed'"):
        load_config(None, {"sed": 1})


def test_typo_in_a_config_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\ndevise: cpu\n")
    with pytest.raises(ConfigError, match="'devise'.*Did you mean 'device'"):
        load_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg["name"] == yaml.safe_load(path.read_text()).get("name", path.stem)
    assert cfg["run_dir"]


@pytest.mark.parametrize("override,words", [
    ({"heal.steps": "ten"}, ["'heal.steps'", "'ten' (str)", "an integer"]),   # null default: typed by NULL_DEFAULT_TYPES
    ({"heal.lr": "fast"}, ["'heal.lr'", "a number"]),
    ({"heal.resume": 1}, ["'heal.resume'", "true or false"]),
    ({"seed": 1.5}, ["'seed'", "an integer"]),
    ({"heal.nproc": None}, ["'heal.nproc'", "null, which this key does not take"]),
    ({"sensitivity.panel_blocks": 3}, ["a string (or a list)"]),
    ({"mpo.chi_sweep": [1, "a"]}, ["'mpo.chi_sweep'", "position 1"]),
    ({"eval.limit": "all"}, ["'eval.limit'", "one integer for all"]),
    ({"heal": 3}, ["'heal'", "a mapping"]),
    ({"eval.tasks": ["piqa", "mmlu_pro"]}, ["unknown task 'mmlu_pro'", "Did you mean 'mmlu'", "Known tasks"]),
])
def test_wrong_types_and_unknown_tasks_fail_at_load(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", override)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert "Fix" in str(err.value) or "Known tasks" in str(err.value)


@pytest.mark.parametrize("override", [{"heal.lr": 1}, {"eval.limit": 5}, {"eval.limit": None}, {"eval.limit.mmlu": None},
                                      {"sensitivity.panel_blocks": [0, 3]}, {"eval.autocast": None}, {"heal.steps": 4},
                                      {"heal.steps": None}, {"frontier.keeps": [1, 0.5]}, {"eval.tasks": ["piqa"]}])
def test_documented_alternatives_are_accepted(override):
    load_config("configs/smoke.yaml", override)


def test_wrong_type_in_a_config_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("heal:\n  steps: ten\n")
    with pytest.raises(ConfigError, match="'heal.steps' is 'ten'"):
        load_config(p)


def test_command_line_overrides_read_exponent_numbers_as_numbers():
    """--set heal.lr=5e-4: PyYAML (YAML 1.1) reads an exponent without a dot as a string, which the
    type check would then refuse; on the command line it is a number, in lists too."""
    from compactify.config import parse_overrides

    o = parse_overrides(["heal.lr=5e-4", "heal.lr_sweep=[1e-4, 3.0e-4]", "name=1e5x", "heal.data=heal"])
    assert o == {"heal.lr": 5e-4, "heal.lr_sweep": [1e-4, 3e-4], "name": "1e5x", "heal.data": "heal"}
    assert load_config("configs/smoke.yaml", parse_overrides(["heal.lr=5e-4"]))["heal"]["lr"] == 5e-4
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides(["heal.lr"])
