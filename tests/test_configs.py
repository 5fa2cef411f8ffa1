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


@pytest.mark.parametrize(
    "stage, offered", [("sft", "'fit', 'validate'"), ("pm", "'fit', 'validate'"), ("dpo", "'fit', 'validate'"),
                       ("ppo", "'fit'")],
)  # fmt: skip
def test_stages_offer_only_the_subcommands_they_implement(stage, offered, capsys):
    # Lightning's CLI offers test and predict to every module; none of these has a test_step (nor PPO a
    # validation_step), so the parser refuses them before any model is loaded.
    for sub in ("test", "predict", "validate"):
        if sub == "validate" and stage != "ppo":
            continue
        with pytest.raises(SystemExit) as done:
            main([stage, sub])
        assert done.value.code == 2
        assert f"invalid choice: '{sub}' (choose from {offered})" in capsys.readouterr().err


def test_nested_override_of_a_pipeline_section_keeps_the_config_keys_beside_it(capsys):
    # jsonargparse alone would replace the config's whole `critique` with {rounds: '4'}, dropping keep_unfinished
    # (without which the tiny random model's never-ending texts give SFT no data).
    config = str(CONFIGS / "pipeline" / "tiny.yaml")
    with pytest.raises(SystemExit) as done:
        main(["pipeline", "--config", config, "--sl_data.critique.rounds", "4", "--sft.trainer.max_steps=7",
              "--sl_data.chunk_size", "8", "--print_config"])  # fmt: skip
    assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load((CONFIGS / "pipeline" / "tiny.yaml").read_text())
    assert printed["sl_data"]["critique"] == {**written["sl_data"]["critique"], "rounds": 4}
    assert printed["sft"]["trainer"] == {**written["sft"]["trainer"], "max_steps": 7}
    assert printed["sl_data"]["chunk_size"] == 8  # an int, as in a config file (jsonargparse alone: '8')
    assert printed["sl_data"]["prompts"] == written["sl_data"]["prompts"]  # other sections untouched
    with pytest.raises(SystemExit) as done:
        main(["pipeline", "--config", config, "--sl_data.critique.rounds"])
    assert done.value.code == 2 and "--sl_data.critique.rounds: expected a value" in capsys.readouterr().err
