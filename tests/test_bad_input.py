"""Bad input through the real ``cai`` command: every mistake is one line naming the culprit, exit status 2.

Each row of ``CASES`` is a mistake a user can make with one command. The rows run in one subprocess of the real
``cai.cli.main`` (``DRIVER``: the imports are paid once, about 4 s, instead of once per row), each with its own
stderr, exit status and check of the workspace: a row passes when the exit status is 2, stderr holds one error line
(``cai COMMAND: error: ...``) and no traceback, its last line names the culprit, and no file that existed before
(a pre-existing output folder included) was changed. One row per command also runs as its own ``python -m cai.cli``
process (``SOLO``), to check the real exit status and stderr of the process.

Every row fails before a model is loaded (most before any is read), so the whole file takes well under 3 minutes on
one thread.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import clean_env
from helpers import run_args as helpers_run_args

pytestmark = pytest.mark.slow  # subprocesses of the real CLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# (id, command line with {placeholders} of the workspace, text the last stderr line must hold)
CASES: list[tuple[str, list[str], str]] = [
    # tiny-model
    ("tiny-unknown-arch", ["tiny-model", "--arch", "bert", "--out", "{ws}/new"], "arch='bert'"),
    ("tiny-vocab-too-small", ["tiny-model", "--vocab_size", "100", "--out", "{ws}/new"], "vocab_size=100"),
    ("tiny-out-is-a-file", ["tiny-model", "--out", "{ws}/file.txt"], "file.txt is a file"),
    ("tiny-out-under-a-file", ["tiny-model", "--out", "{ws}/file.txt/sub"], "lies under"),
    ("tiny-missing-corpus", ["tiny-model", "--corpus", "{ws}/missing.txt", "--out", "{ws}/new"], "missing.txt"),
    ("tiny-bad-int", ["tiny-model", "--seed", "x"], '"seed"'),
    # import-model
    ("import-missing-package", ["import-model", "--source", "package:no_such_pkg_xyz"], "no_such_pkg_xyz"),
    ("import-missing-gguf", ["import-model", "--source", "{ws}/missing.gguf", "--out", "{ws}/new"], "missing.gguf"),
    ("import-bad-dtype", ["import-model", "--source", "{model}", "--dtype", "int8", "--out", "{ws}/new"], "int8"),
    ("import-out-is-a-file", ["import-model", "--source", "{model}", "--out", "{ws}/file.txt"], "file.txt"),
    ("import-source-not-a-model", ["import-model", "--source", "{ws}/file.txt", "--out", "{ws}/new"], "not a model"),
    # sl-data
    ("sl-no-model", ["sl-data", "--out", "{ws}/new"], "model.name_or_path is required"),
    ("sl-default-tiny-missing", ["sl-data", "--model.name_or_path", "runs/tiny-llama"], "cai tiny-model"),
    ("sl-missing-abs-model", ["sl-data", "--model.name_or_path", "/no/such/model"], "/no/such/model"),
    ("sl-missing-dot-model", ["sl-data", "--model.name_or_path", "./nomodel"], "./nomodel"),
    ("sl-model-no-weights", ["sl-data", "--model.name_or_path", "{ws}/noweights"], "weights"),
    ("sl-model-no-tokenizer", ["sl-data", "--model.name_or_path", "{ws}/notok"], "tokenizer files"),
    ("sl-empty-prompts", ["sl-data", "{M}", "--prompts.red_team", "{ws}/empty.jsonl"], "empty.jsonl"),
    ("sl-not-utf8", ["sl-data", "{M}", "--prompts.red_team", "{ws}/latin.jsonl"], "latin.jsonl: line 2: not UTF-8"),
    ("sl-invalid-json", ["sl-data", "{M}", "--prompts.red_team", "{ws}/bad.jsonl"], "bad.jsonl: line 2"),
    ("sl-no-prompt-column", ["sl-data", "{M}", "--prompts.red_team", "{ws}/nocol.jsonl"], "no column 'prompt'"),
    ("sl-missing-prompts", ["sl-data", "{M}", "--prompts.red_team", "{ws}/missing.jsonl"], "missing.jsonl"),
    ("sl-unknown-builtin", ["sl-data", "{M}", "--prompts.red_team", "red_teem"], "red_teem"),
    ("sl-zero-row-dataset", ["sl-data", "{M}", "--prompts.red_team", "{ws}/zero_rows"], "zero_rows: no rows"),
    ("sl-max-new-tokens-0", ["sl-data", "{M}", "--sampling.max_new_tokens", "0"], "sampling.max_new_tokens=0"),
    ("sl-helpful-missing", ["sl-data", "{M}", "--prompts.helpful", "{ws}/missing.jsonl"], "missing.jsonl"),
    ("sl-chunk-size-0", ["sl-data", "{M}", "--chunk_size", "0"], "chunk_size=0"),
    ("sl-chunk-size-text", ["sl-data", "{M}", "--chunk_size", "abc"], '"chunk_size"'),
    ("sl-max-prompts-0", ["sl-data", "{M}", "--prompts.max_prompts", "0"], "prompts.max_prompts=0"),
    ("sl-unknown-option", ["sl-data", "{M}", "--critique.roundz", "2"], "roundz"),
    ("sl-missing-constitution", ["sl-data", "{M}", "--constitution", "{ws}/missing.yaml"], "missing.yaml"),
    ("sl-malformed-constitution", ["sl-data", "{M}", "--constitution", "{ws}/bad.yaml"], "bad.yaml"),
    ("sl-out-is-a-file", ["sl-data", "{M}", "--out", "{ws}/file.txt"], "file.txt is a file"),
    ("sl-missing-config", ["sl-data", "--config", "{ws}/missing_config.yaml"], "missing_config.yaml"),
    # sft
    ("sft-batch-size-0", ["sft", "fit", "{SFT}", "--data.batch_size", "0"], "data.batch_size=0"),
    ("sft-max-length-neg", ["sft", "fit", "{SFT}", "--data.max_length", "-1"], "data.max_length=-1"),
    ("sft-empty-file", ["sft", "fit", "{SFT}", "--data.train", "{ws}/empty.jsonl"], "empty.jsonl"),
    ("sft-default-data-missing", ["sft", "fit", "{SFT}", "--data.train", "runs/tiny/sl_data/sft"], "cai sl-data"),
    ("sft-no-columns", ["sft", "fit", "{SFT}", "--data.train", "{ws}/nocol.jsonl"], "'messages'"),
    ("sft-zero-row-dataset", ["sft", "fit", "{SFT}", "--data.train", "{ws}/zero_rows"], "zero_rows: no rows"),
    ("sft-last-turn-user", ["sft", "fit", "{SFT}", "--data.train", "{ws}/user_last.jsonl"], "user_last.jsonl: row 2"),
    ("sft-hf-out-is-a-file", ["sft", "fit", "{SFT}", "--model.hf_out", "{ws}/file.txt"], "model.hf_out"),
    ("sft-default-model-missing", ["sft", "fit", "{SFTCFG}", "--data.train", "{ws}/sft.jsonl"], "cai tiny-model"),
    ("sft-bad-int", ["sft", "fit", "{SFT}", "--trainer.max_steps", "abc"], "trainer.max_steps"),
    ("sft-prompt-format", ["sft", "fit", "{SFT}", "--data.prompt_format", "md"], "data.prompt_format='md'"),
    ("sft-max-steps-neg", ["sft", "fit", "{SFT}", "--trainer.max_steps", "-5"], "max_steps"),
    (
        "sft-log-dir-is-a-file",
        ["sft", "fit", "{SFT}", "--trainer.logger.init_args.save_dir", "{ws}/file.txt"],
        "file.txt",
    ),
    ("sft-val-missing", ["sft", "fit", "{SFT}", "--data.val", "{ws}/missing.jsonl"], "data.val: "),
    # label
    ("label-paper-constitution-no-feedback", ["label", "{P}", "--constitution", "{ws}/paper"], "RLMadisonInstructions"),
    ("label-no-policy", ["label", "--out", "{ws}/new"], "policy.name_or_path is required"),
    ("label-bad-prompt-format", ["label", "{P}", "--sampling.prompt_format", "markdown"], '"prompt_format"'),
    ("label-default-policy-missing", ["label", "--config", "{cfg}/label/tiny.yaml"], "runs/tiny/sft/hf"),
    # eval-feedback
    ("evalfb-wrong-schema", ["eval-feedback", "{M}", "--evals", "{ws}/wrong.jsonl"], "wrong.jsonl: line 1: 'prompt'"),
    ("evalfb-missing-file", ["eval-feedback", "{M}", "--evals", "{ws}/missing.jsonl"], "missing.jsonl"),
    (
        "evalfb-batch-size-0",
        ["eval-feedback", "{M}", "--evals", "{ws}/wrong.jsonl", "--batch_size", "0"],
        "batch_size=0",
    ),
    ("evalfb-not-utf8", ["eval-feedback", "{M}", "--evals", "{ws}/latin.jsonl"], "latin.jsonl: line 2: not UTF-8"),
    ("evalfb-no-model", ["eval-feedback", "--evals", "{ws}/wrong.jsonl"], "model.name_or_path is required"),
    # pm
    ("pm-p-chosen-above-1", ["pm", "fit", "{PM}", "--data.train", "{ws}/p15.jsonl"], "p15.jsonl: row 1: p_chosen=1.5"),
    ("pm-p-chosen-nan", ["pm", "fit", "{PM}", "--data.train", "{ws}/p_nan"], "p_nan: row 2: p_chosen=nan"),
    ("pm-no-chosen", ["pm", "fit", "{PM}", "--data.train", "{ws}/nochosen.jsonl"], "no column 'chosen'"),
    ("pm-batch-size-neg", ["pm", "fit", "{PM}", "--data.batch_size", "-2"], "data.batch_size=-2"),
    ("pm-default-data-missing", ["pm", "fit", "{PM}", "--data.train", "runs/tiny/label/pairs"], "cai label"),
    # ppo
    ("ppo-batch-size-0", ["ppo", "fit", "{PPO}", "--data.batch_size", "0"], "data.batch_size=0"),
    ("ppo-minibatches-0", ["ppo", "fit", "{PPO}", "--model.ppo.num_minibatches", "0"], "ppo.num_minibatches=0"),
    ("ppo-empty-prompts", ["ppo", "fit", "{PPO}", "--data.prompts", "{ws}/empty.jsonl"], "empty.jsonl"),
    ("ppo-max-prompt-tokens-0", ["ppo", "fit", "{PPO}", "--data.max_prompt_tokens", "0"], "data.max_prompt_tokens=0"),
    ("ppo-pm-missing", ["ppo", "fit", "{PPOPM}"], "runs/tiny/pm/hf"),
    ("ppo-pm-and-reward", ["ppo", "fit", "{PPOPM}", "--model.reward_function", "m:f"], "give exactly one of"),
    # eval
    ("eval-no-models", ["eval", "--out", "{ws}/new"], "models is required"),
    ("eval-default-models-missing", ["eval", "--config", "{cfg}/eval/tiny.yaml"], "cai tiny-model"),
    (
        "eval-missing-exclude",
        ["eval", "--models", '{{"a": "{model}"}}', "--exclude", '["{ws}/none.jsonl"]'],
        "none.jsonl",
    ),
    ("eval-num-prompts-0", ["eval", "--models", '{{"a": "{model}"}}', "--num_prompts", "0"], "num_prompts=0"),
    # report
    ("report-missing-run", ["report", "--run_dir", "{ws}/no_run"], "no_run"),
    ("report-run-is-a-file", ["report", "--run_dir", "{ws}/file.txt"], "file.txt"),
    # pipeline
    ("pipeline-ppo-typo", ["pipeline", "{PIPE}", "--ppo.model.ppo.kl_coeff", "0.1"], "kl_coeff"),
    ("pipeline-ppo-bad-value", ["pipeline", "{PIPE}", "--ppo.model.ppo.kl_coef", "-1"], "ppo: ppo.kl_coef=-1"),
    ("pipeline-sft-batch-0", ["pipeline", "{PIPE}", "--sft.data.batch_size", "0"], "sft: data.batch_size=0"),
    ("pipeline-sl-rounds-neg", ["pipeline", "{PIPE}", "--sl_data.critique.rounds", "-1"], "critique.rounds=-1"),
    ("pipeline-label-chunk-0", ["pipeline", "{PIPE}", "--label.chunk_size", "0"], "label: chunk_size=0"),
    ("pipeline-missing-base", ["pipeline", "{PIPE}", "--base_model", "{ws}/no_model"], "no_model"),
    (
        "pipeline-run-dir-file",
        ["pipeline", "--config", "{cfg}/pipeline/tiny.yaml", "--run_dir", "{ws}/file.txt"],
        "file.txt is a file",
    ),
    ("pipeline-tiny-arch", ["pipeline", "{PIPE}", "--tiny.arch", "bert"], "tiny: arch='bert'"),
    ("unknown-command", ["sl_data"], "unknown command 'sl_data'"),
]

SOLO = [
    "tiny-unknown-arch",
    "import-missing-package",
    "sl-not-utf8",
    "sft-empty-file",
    "label-paper-constitution-no-feedback",
    "evalfb-wrong-schema",
    "pm-p-chosen-nan",
    "ppo-minibatches-0",
    "eval-no-models",
    "report-missing-run",
    "pipeline-ppo-typo",
]
"""Rows also run as a process of their own: one per command."""

XFAIL: dict[str, str] = {}
"""Rows for mistakes not handled yet -> why (marked ``xfail(strict=True)``, never dropped)."""

DRIVER = r"""
import contextlib, io, json, os, sys, traceback
from cai.cli import main

cases, snapshot_root, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

def snapshot():
    files = {}
    for dirpath, _, names in os.walk(snapshot_root):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            files[p] = (st.st_size, st.st_mtime_ns)
    return files

results = {}
for case in cases:
    before = snapshot()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(case["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            code = 1
            traceback.print_exc()
    after = snapshot()
    changed = sorted(p for p, v in before.items() if after.get(p) != v)
    results[case["id"]] = {"code": code, "stderr": err.getvalue(), "changed": changed}
with open(out, "w") as f:
    json.dump(results, f)
"""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir) -> Path:
    """A workspace of bad inputs, a pre-existing output folder, and broken copies of the tiny model."""
    import datasets

    ws = tmp_path_factory.mktemp("bad_input")
    (ws / "file.txt").write_text("a file, not a folder\n")
    (ws / "out").mkdir()
    (ws / "out" / "records.jsonl").write_text('{"id": "x"}\n')  # a pre-existing output: must not change
    (ws / "empty.jsonl").write_text("")
    (ws / "latin.jsonl").write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    (ws / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    _write_jsonl(ws / "nocol.jsonl", [{"text": "a"}, {"text": "b"}])
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).save_to_disk(str(ws / "zero_rows"))
    (ws / "bad.yaml").write_text("critiques: [\n")
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    _write_jsonl(ws / "sft.jsonl", [{"messages": turn}] * 4)
    _write_jsonl(ws / "user_last.jsonl", [{"messages": turn}, {"messages": turn[:1]}, {"messages": turn}])
    pair = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    _write_jsonl(ws / "p15.jsonl", [dict(pair, p_chosen=1.5), dict(pair, p_chosen=0.7)])
    nan = {k: [v, v] for k, v in pair.items()} | {"p_chosen": [0.8, float("nan")]}
    datasets.Dataset.from_dict(nan).save_to_disk(str(ws / "p_nan"))
    _write_jsonl(ws / "nochosen.jsonl", [{"prompt": "hi", "response": "x"}] * 2)
    _write_jsonl(ws / "wrong.jsonl", [{"question": "q", "answer": "a"}])
    (ws / "paper").mkdir()
    paper = {"harmful0": {"prompt": ["Identify harm."], "edit_request": "Remove the harm."}}
    (ws / "paper" / "CritiqueRevisionInstructions.json").write_text(json.dumps(paper))
    for name, drop in (("noweights", ("model.safetensors",)), ("notok", ("tokenizer.json", "tokenizer_config.json"))):
        shutil.copytree(tiny_model_dir, ws / name)
        for f in drop:
            (ws / name / f).unlink()
    return ws


def _expand(argv: list[str], ws: Path, model: Path) -> list[str]:
    def run_args(config: str) -> list[str]:  # outputs into the pre-existing folder ws/out
        return helpers_run_args(str(CONFIGS / config), model, ws / "out")[1:]  # without the leading "fit"

    groups = {
        "{M}": ["--model.name_or_path", str(model), "--out", str(ws / "out")],
        "{P}": ["--policy.name_or_path", str(model), "--out", str(ws / "out")],
        "{SFT}": run_args("sft/tiny.yaml") + ["--data.train", str(ws / "sft.jsonl")],
        "{SFTCFG}": ["--config", str(CONFIGS / "sft/tiny.yaml")],
        "{PM}": run_args("pm/tiny.yaml"),
        "{PPO}": run_args("ppo/tiny.yaml")
        + ["--model.preference_model", "null", "--model.reward_function", "cai.method.rewards:letter_share"],
        "{PPOPM}": run_args("ppo/tiny.yaml"),
        "{PIPE}": ["--config", str(CONFIGS / "pipeline/tiny.yaml"), "--run_dir", str(ws / "out")],
    }
    out = []
    for a in argv:
        if a in groups:
            out += groups[a]
        else:
            out.append(a.format(ws=ws, model=model, cfg=CONFIGS))
    return out


@pytest.fixture(scope="module")
def results(ws, tiny_model_dir, tmp_path_factory) -> dict:
    """Every row run once, in one process of the real ``cai.cli.main`` with ``ws`` as its working directory."""
    cases = [{"id": cid, "argv": _expand(argv, ws, tiny_model_dir)} for cid, argv, _ in CASES]
    out = tmp_path_factory.mktemp("bad_input_results") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases), str(ws), str(out)],
        cwd=ws,
        env=clean_env() | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(code: int, stderr: str, culprit: str, command: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, stderr[-3000:]
    errors = [line for line in lines if ": error: " in line or line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]  # one error line, nothing else of the mistake
    assert lines[-1] == errors[0] and lines[-1].startswith(f"cai {command}: error: "), stderr[-3000:]
    assert culprit in lines[-1], lines[-1]


def _params():
    for cid, argv, culprit in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[cid])] if cid in XFAIL else []
        yield pytest.param(cid, argv, culprit, id=cid, marks=marks)


@pytest.mark.parametrize("cid, argv, culprit", list(_params()))
def test_bad_input_is_one_line_naming_the_culprit(results, cid, argv, culprit):
    res = results[cid]
    command = argv[0] if argv[0] != "sl_data" else None
    if command is None:  # an unknown command has no command name to prefix
        assert res["code"] == 2 and res["stderr"].strip().splitlines()[-1] == "cai: error: unknown command 'sl_data'"
        return
    _check(res["code"], res["stderr"], culprit, command)
    assert not res["changed"], f"changed existing files: {res['changed']}"


@pytest.mark.parametrize("cid", SOLO)
def test_the_process_exits_2_with_one_line(ws, tiny_model_dir, cid):
    argv, culprit = next((a, c) for i, a, c in CASES if i == cid)
    before = {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "cai.cli", *_expand(argv, ws, tiny_model_dir)],
        cwd=ws,
        env=clean_env() | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check(proc.returncode, proc.stderr, culprit, argv[0])
    assert {p: p.stat().st_mtime_ns for p in before if p.exists()} == before


def test_cai_debug_shows_the_traceback(ws):
    env = clean_env() | {"PYTHONPATH": str(REPO), "CAI_DEBUG": "1"}
    argv = ["report", "--run_dir", str(ws / "no_run")]
    proc = subprocess.run([sys.executable, "-m", "cai.cli", *argv], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "no_run" in proc.stderr


def test_a_huge_prompt_is_skipped_unread_whatever_max_chars_says(tmp_path, tiny_tokenizer):
    from data.prompts import HARD_MAX_CHARS, load_prompts_with_stats

    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 200_000}, {"prompt": "short"}, {"prompt": "y " * 300}])
    ds, stats = load_prompts_with_stats(str(tmp_path / "p.jsonl"), max_chars=None)
    assert ds["prompt"] == ["short", "y " * 300] and stats.skipped_too_long == 1 and 200_000 > HARD_MAX_CHARS
    calls = []

    def counting(text, **kw):
        calls.append(len(text))
        return tiny_tokenizer(text, **kw)

    ds, stats = load_prompts_with_stats(str(tmp_path / "p.jsonl"), max_tokens=100, tokenizer=counting)
    assert ds["prompt"] == ["short"] and stats.skipped_too_long == stats.skipped_too_many_tokens == 2
    assert max(calls) <= 100 * 32  # the 200,000-character prompt was never tokenized
