"""Issue 16, configs: a config reads only its own file, its ``base:`` files and the
``key=value`` overrides. No resolver may be called (``${oc.env:...}`` or any other), so the
environment cannot reach run names, config.yaml or checkpoints; and an error about a file
(a ``base:`` pointing anywhere, outside the repository included) names the file and the
problem, never the file's contents."""
import traceback
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from synthetic import tiny_model_cfg
from utils.initialize_configs import ConfigError, instantiate_from_configs, load_config, validate_target_config

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"
SECRET = "s3cr3t-7fq2"


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("CDM4MI_TEST_SECRET", SECRET)


def refused(excinfo) -> str:
    """The error's message and its whole printed traceback (chained errors included): the
    secret must be in neither."""
    text = "".join(traceback.format_exception(excinfo.value))
    assert SECRET not in text
    return str(excinfo.value)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("value, resolver", [
    ("${oc.env:CDM4MI_TEST_SECRET}", "oc.env"),
    ("run-${oc.env:CDM4MI_TEST_SECRET,none}", "oc.env"),
    ("${ oc.env : CDM4MI_TEST_SECRET }", "oc.env"),
    ("${oc.decode:'$\\\\{oc.env:CDM4MI_TEST_SECRET}'}", "oc.decode"),  # a resolver that would build another
    ("${oc.select:logging.project,${oc.env:CDM4MI_TEST_SECRET}}", "oc.select"),
    ("${${logging.project}:CDM4MI_TEST_SECRET}", "${logging.project}"),  # a resolver named by an interpolation
])
def test_a_config_file_may_not_call_a_resolver(tmp_path, value, resolver):
    path = write(tmp_path / "run.yaml", f"base: {BUNDLED}\nlogging:\n  project: oc.env\n  name: \"{value}\"\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert refused(excinfo).startswith(f"{path}: logging.name: calls the resolver {resolver!r}; a config may not call")


def test_an_override_may_not_call_a_resolver():
    for override, key in (("logging.name=${oc.env:CDM4MI_TEST_SECRET}", "logging.name"),
                          ("data.params.volumes=[{path: '${oc.env:CDM4MI_TEST_SECRET}'}]", "data.params.volumes[0].path")):
        with pytest.raises(ConfigError) as excinfo:
            load_config(BUNDLED, [override])
        assert refused(excinfo).startswith(f"override '{override}': {key}: calls the resolver 'oc.env'")


def test_base_may_not_be_read_from_the_environment(tmp_path):
    path = write(tmp_path / "run.yaml", "base: ${oc.env:CDM4MI_TEST_SECRET}/x.yaml\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert refused(excinfo).startswith(f"{path}: base: calls the resolver 'oc.env'")


def test_references_to_the_configs_own_keys_still_work(tmp_path):
    path = write(tmp_path / "run.yaml", f"base: {BUNDLED}\nlogging:\n  name: \"run-${{trainer.max_steps}}\"\n"
                                        "  project: \"\\\\${oc.env:CDM4MI_TEST_SECRET}\"\n")
    cfg = load_config(path, ["trainer.max_steps=7"])
    assert cfg.logging.name == "run-7"
    assert cfg.logging.project == "${oc.env:CDM4MI_TEST_SECRET}"  # escaped: a literal, never resolved


def test_a_config_built_in_code_is_checked_where_it_is_resolved():
    cfg = OmegaConf.create({"model": tiny_model_cfg()})
    cfg.model.params.unet_rosinality_config.params.dropout = "${oc.env:CDM4MI_TEST_SECRET}"
    for call in (validate_target_config, instantiate_from_configs):
        with pytest.raises(ConfigError) as excinfo:
            call(cfg.model, "model")
        assert refused(excinfo).startswith("model.params.unet_rosinality_config.params.dropout: calls the resolver")


BASE_FILES = {  # what a base outside the repository might be, with the secret in it
    "credentials": f"[default]\naws_access_key_id = AKIA{SECRET}\n",
    "netrc": f"machine example.org login bob password {SECRET}\n",
    "env": f"API_TOKEN={SECRET}\nOTHER=1\n",
    "list.yaml": f"- {SECRET}\n- two\n",
    "keys.yaml": f"{SECRET}: 1\n",
    "quoted.yaml": f'token: "{SECRET}\n',
    "tag.yaml": f"token: !!python/object:os.system {SECRET}\n",
    "binary": b"\x89PNG\x00\x01" + SECRET.encode(),
    "merge.yaml": f"trainer: [{SECRET}]\n",
}


@pytest.mark.parametrize("name", list(BASE_FILES))
def test_an_error_about_a_base_file_names_it_but_never_quotes_it(tmp_path, name):
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    content = BASE_FILES[name]
    outside.write_bytes(content if isinstance(content, bytes) else content.encode())
    path = write(tmp_path / "run.yaml", f"base: {outside}\ntrainer:\n  max_steps: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = refused(excinfo)
    assert message.startswith(f"{path}: base: " if name == "merge.yaml" else f"{outside}: ")


def test_a_misspelt_section_is_still_named(tmp_path):
    base = write(tmp_path / "base.yaml", f"trainr:\n  max_steps: 1\n{SECRET}: 2\n")
    path = write(tmp_path / "run.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert refused(excinfo).startswith(f"{base}: unknown top-level keys: 'trainr' (did you mean 'trainer'?), "
                                       "1 not shown")
    with pytest.raises(ConfigError, match=r"unknown top-level keys \['trainr'\]"):  # an override's key is named
        load_config(BUNDLED, ["trainr.max_steps=5"])
