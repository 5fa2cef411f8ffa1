"""Every shipped config parses against the code it configures (nothing is downloaded or built)."""

from pathlib import Path

import pytest
import yaml

from cai.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path, capsys):
    stage = path.parent.name
    if stage == "strategies":
        assert "trainer" in yaml.safe_load(path.read_text())
        return
    name = stage.replace("_", "-")
    args = [name, "fit"] if stage in ("sft", "pm", "ppo", "dpo") else [name]
    with pytest.raises(SystemExit) as done:
        main([*args, "--config", str(path), "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert yaml.safe_load(capsys.readouterr().out)  # the full, resolved config
