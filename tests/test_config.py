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
