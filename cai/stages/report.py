"""A Markdown report of a pipeline run: ``cai report --run_dir runs/demo``.

It reads whatever the run directory holds (see ``cai.stages.pipeline``): TensorBoard logs of the training stages, the
SL-CAI records, the AI labels, the evaluation and the configs, and writes ``run_dir/report.md`` with its figures in
``run_dir/report/``. Figures are drawn from the run's own data; a stage that has not run gets a one-line note.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from cai.method.elo import elo_table, head_to_head
from cai.method.figures import KNOWN_TAGS, plot_curves, plot_label_histogram, read_scalars
from cai.stages.report_files import _safe, cell, finals, fmt, last, read_json, read_jsonl, read_yaml

STAGES = {
    "sft": "SFT (SL-CAI model)",
    "pm": "Preference model",
    "ppo": "PPO (RL-CAI model)",
    "dpo": "DPO (RL-CAI model by DPO)",
}
"""Training stage folder -> title; each holds TensorBoard event files somewhere below it."""
RL_STAGES = {"ppo": ("pm", "ppo"), "dpo": ("dpo",), "both": ("pm", "ppo", "dpo")}
"""The pipeline's ``rl`` setting -> the training stages it runs after SFT."""
RENAMED_TAGS = {"ppo": {"val/clipfrac": "value/clipfrac", "val/explained_variance": "value/explained_variance"}}
"""Stage -> {old tag: new tag}: PPO's value-head metrics were logged under ``val/`` before, which means validation."""
SECTION_TITLES = {
    "summary": "How the run went",
    "curves": "Training curves",
    "labels": "AI feedback labels and calibration",
    "evaluation": "Evaluation: win rates and Elo",
    "samples": "Samples",
    "configs": "Configs",
}
NUM_SAMPLES = 3
"""Held-out prompts shown per prompt set, every evaluated model's answer side by side."""
NUM_CRITIQUE_SAMPLES = 2
"""SL-CAI records shown with their critiques and revisions."""
MODEL_ORDER = ("base", "sl-cai", "rl-cai", "rl-cai-dpo")
"""Evaluated models in this order first (the method's order), any others after."""
MODELS_EXPLAINED = {
    "base": "the model being aligned",
    "sl-cai": "SFT on the critiqued and revised answers",
    "rl-cai": "RL-CAI by PPO against the preference model",
    "rl-cai-dpo": "RL-CAI by DPO on the AI labels",
}
"""The pipeline's model labels, explained in front of the evaluation."""
NEAR_CHANCE = 0.05
"""A prompt set whose soft win rates all lie within this of 0.5 gets a note: its Elo and hard rates say little."""


class Report:
    """Collects the report's Markdown and writes its figures into ``run_dir/report``.

    Args:
        run_dir: The pipeline's run directory.
    """

    def __init__(self, run_dir: str | Path):
        self.run = Path(run_dir)
        self.fig_dir = self.run / "report"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.scalars = {s: _safe(read_scalars, self.run / s, {}) if (self.run / s).is_dir() else {} for s in STAGES}
        for stage, renames in RENAMED_TAGS.items():  # runs logged before a rename plot under the new names
            self.scalars[stage] = {renames.get(t, t): v for t, v in self.scalars[stage].items()}
        self.eval = _safe(read_json, self.run / "eval" / "eval.json", None)
        self.stages = self._stages_of_run()

    def _stages_of_run(self) -> list[str]:
        """The training stages this run has or was set to run (``rl`` in ``pipeline.yaml``), in the method's order.

        SFT, the preference model and PPO are listed unless the run is a DPO-only one (``rl: dpo``); DPO when the
        run's ``rl`` asks for it or its folder exists. A run folder without ``pipeline.yaml`` lists the first three.
        """
        settings = _safe(read_yaml, self.run / "pipeline.yaml", None)
        rl = settings.get("rl") if isinstance(settings, dict) else None
        wanted = {"sft", *RL_STAGES.get(rl, RL_STAGES["ppo"])}
        return [s for s in STAGES if s in wanted or (self.run / s).is_dir()]

    def image(self, path: Path, alt: str) -> str:
        """Markdown for a figure in ``report/`` (copied there when it lives elsewhere in the run)."""
        if path.parent != self.fig_dir:
            target = self.fig_dir / f"{path.parent.name}_{path.name}"
            shutil.copyfile(path, target)
            path = target
        return f"![{alt}]({path.relative_to(self.run).as_posix()})"

    def summary(self) -> list[str]:
        """'How the run went': one line per stage with its key numbers, then the Elo table."""
        sl = read_json(self.run / "sl_data" / "summary.json")
        lab = read_json(self.run / "label" / "summary.json")
        base = (read_json(self.run / "pipeline_summary.json") or {}).get("models", {}).get("base")
        base = base or ("base_model/" if (self.run / "base_model" / "config.json").exists() else None)
        sft, pm, ppo, dpo = (self.scalars[s] for s in STAGES)
        results = {
            "base model": base and f"`{base}`",
            "SL-CAI data": sl
            and f"{sl['records']} records, {sl['rounds']} rounds, {sl.get('empty_revisions', 0)} empty revisions",
            "SFT": sft and finals(sft, "loss/train", "val/loss"),
            "AI labels": lab
            and f"{lab['pairs']} pairs, mean p_chosen {fmt(lab['mean_p_chosen'])}, "
            f"{lab['cot_fallbacks']} chain-of-thought fallbacks",
            "preference model": pm and finals(pm, "val/loss", "val/accuracy"),
            "PPO": ppo and finals(ppo, "objective/scores", "objective/kl"),
            "DPO": dpo and finals(dpo, "loss/dpo", "rewards/margin", "rewards/accuracy"),
            "evaluation": self.eval and ", ".join(self.eval["labels"]) + " compared",
        }
        not_in_run = {"preference model": "pm", "PPO": "ppo", "DPO": "dpo"}
        results = {k: v for k, v in results.items() if not_in_run.get(k, "sft") in self.stages}
        lines = ["| stage | status | result |", "|---|---|---|"]
        lines += [f"| {k} | {'done' if v else 'not run'} | {cell(v) if v else ''} |" for k, v in results.items()]
        if self.eval:
            lines += ["", elo_table(self.eval)]
        return lines

    def curves(self) -> list[str]:
        """Training curves of every stage from its TensorBoard logs."""
        lines: list[str] = []
        for stage in self.stages:
            title = STAGES[stage]
            lines += [f"### {title}", ""]
            scalars = self.scalars[stage]
            if not scalars:
                lines += [f"Not run: no TensorBoard scalars under `{stage}/`.", ""]
                continue
            path = plot_curves(scalars, title, self.fig_dir / f"{stage}_curves.png")
            finals = ", ".join(f"{t} {fmt(last(scalars, t))}" for t in KNOWN_TAGS if t in scalars)
            lines += [self.image(path, f"{title} curves"), "", f"Final values: {finals or '-'}.", ""]
        return lines

    def labels(self) -> list[str]:
        """The AI labels' distribution and, when measured, the feedback model's calibration."""
        lines: list[str] = []
        records = read_jsonl(self.run / "label" / "records.jsonl")
        if records:
            path = plot_label_histogram(records, self.fig_dir / "label_histogram.png")
            lines += [self.image(path, "AI label histogram"), ""]
            lines += [
                "Labels near 0.5 mean the feedback model could not tell the two responses apart (chain-of-thought "
                "labels are also clamped to [0.4, 0.6]); confident labels sit near 0 and 1.",
                "",
            ]
        else:
            lines += ["Not run: no `label/records.jsonl`.", ""]
        found = False
        for folder in ("eval_feedback", "eval/hhh"):
            metrics = read_json(self.run / folder / "metrics.json")
            if metrics is None:
                continue
            found = True
            lines += [
                f"Feedback model on `{Path(metrics['evals']).name}` ({metrics['examples']} rows): accuracy "
                f"{fmt(metrics['accuracy'])} (chance {fmt(metrics['chance_accuracy'])}), expected calibration "
                f"error {fmt(metrics['expected_calibration_error'])}.",
                "",
            ]
            if (self.run / folder / "reliability.png").exists():
                lines += [self.image(self.run / folder / "reliability.png", "reliability diagram"), ""]
        if not found:
            lines += ["Calibration not measured: no `eval_feedback/metrics.json` or `eval/hhh/metrics.json`.", ""]
        return lines

    def evaluation(self) -> list[str]:
        """Win rates, Elo and preference-model scores from ``eval/eval.json``."""
        if self.eval is None:
            return ["Not run: no `eval/eval.json`.", ""]
        labels = self.eval["labels"]
        lines: list[str] = [WIN_RATES_EXPLAINED, ""]
        if known := [m for m in labels if m in MODELS_EXPLAINED]:
            lines += ["Models: " + "; ".join(f"`{m}`, {MODELS_EXPLAINED[m]}" for m in known) + ".", ""]
        if (self.run / "eval" / "winrates.png").exists():
            lines += [self.image(self.run / "eval" / "winrates.png", "win rates and Elo"), ""]
        if not any(s.get("pm_scores") for s in self.eval["sets"].values()):
            lines += ["No preference-model scores: the evaluation had no preference model (`rl: dpo` trains none).", ""]
        if {"rl-cai", "rl-cai-dpo"} <= set(labels):
            lines += ["**RL-CAI by DPO against RL-CAI by PPO** (`rl-cai-dpo` vs `rl-cai`):", ""]
            lines += head_to_head(self.eval, "rl-cai-dpo", "rl-cai") + [""]
        for name, s in self.eval["sets"].items():
            lines += [
                f"### {s['axis'].capitalize()} ({name}, {s['prompts']} prompts)",
                "",
                f"Principle: *{cell(s['principle']['text'])}*",
                "",
                f"Position bias, the mean probability of picking option (A): {fmt(s['position_bias'])} (0.5: none; "
                "each pair is judged in both orders and averaged).",
                "",
            ]
            lines += near_chance_note(s, labels)
            lines += [
                "| P(row better than column) (hard win rate) | " + " | ".join(labels) + " | PM score |",
                "|---|" + "---|" * (len(labels) + 1),
            ]
            for a in labels:
                rates = [
                    f"{fmt(s['win_rate'][a][b], 2)} ({fmt(s['hard_win_rate'][a][b], 2)})" if a != b else "-"
                    for b in labels
                ]
                pm = s["pm_scores"][a] if s["pm_scores"] else None
                lines.append(f"| {a} | " + " | ".join(rates) + f" | {fmt(pm and pm['mean'])} |")
            lines.append("")
        return lines

    def samples(self) -> list[str]:
        """Held-out prompts with every evaluated model's answer side by side, then SL-CAI critique-revision examples.

        The evaluation's prompts are held out from training, so SL-CAI records (training prompts) never have an
        RL-CAI answer: the side-by-side samples come from ``eval/responses.jsonl``, the critiques from the records.
        """
        lines: list[str] = []
        responses = read_jsonl(self.run / "eval" / "responses.jsonl")
        if responses:
            lines += self._eval_samples(responses)
        else:
            lines += ["Held-out answers: not run (no `eval/responses.jsonl`).", ""]
        lines += ["### SL-CAI: critiques and revisions of a training prompt", ""]
        records = [r for r in read_jsonl(self.run / "sl_data" / "records.jsonl") if r.get("kind") == "red_team"]
        if not records:
            return lines + ["SL-CAI samples: not run (no red-team records in `sl_data/records.jsonl`).", ""]
        lines += [
            "The model's first answer to a red-team prompt, its critiques by randomly drawn principles, its "
            "revisions, and the final revision that SFT trains on.",
            "",
        ]
        for r in records[:NUM_CRITIQUE_SAMPLES]:
            rounds = "<br><br>".join(
                f"**{k + 1}. {x['principle_id']}:** {cell(x['critique'], 300)}" for k, x in enumerate(r["rounds"])
            )
            revisions = "<br><br>".join(f"**{k + 1}.** {cell(x['revision'], 300)}" for k, x in enumerate(r["rounds"]))
            lines += [
                f"**Prompt `{r['id']}`:** {cell(r['prompt'])}",
                "",
                "| initial response | critiques | revisions | final revision (SFT target) |",
                "|---|---|---|---|",
                f"| {cell(r['initial_response'])} | {rounds or '-'} | {revisions or '-'} | "
                f"{cell(r['final_response'])} |",
                "",
            ]
        return lines

    def _eval_samples(self, responses: list[dict]) -> list[str]:
        """``NUM_SAMPLES`` held-out prompts per prompt set: each model's answer and the feedback model's verdict."""
        present = list(dict.fromkeys(r["label"] for r in responses))
        if self.eval:  # the models of the evaluation (answers of a model it no longer compares stay in the file)
            present = [m for m in present if m in self.eval["labels"]]
        labels = [m for m in MODEL_ORDER if m in present] + [m for m in present if m not in MODEL_ORDER]
        anchor = (self.eval or {}).get("labels", labels)[0]
        verdict: dict[tuple, float] = {}  # (set, id, model) -> P(model's answer better than the anchor's)
        for c in read_jsonl(self.run / "eval" / "comparisons.jsonl"):
            if c.get("a") == anchor:
                verdict[(c["set"], c["id"], c["b"])] = 1 - c["p_a"]
            elif c.get("b") == anchor:
                verdict[(c["set"], c["id"], c["a"])] = c["p_a"]
        by_prompt: dict[tuple, dict] = {}
        for r in responses:
            by_prompt.setdefault((r["set"], r["id"]), {"prompt": r["prompt"]})[r["label"]] = r
        note = f" and the feedback model's P(answer better than {anchor}'s), both orders averaged" if verdict else ""
        lines = [
            "### Held-out prompts: every evaluated model's answer",
            "",
            f"Prompts of the evaluation (held out from training), {NUM_SAMPLES} per prompt set, with each model's "
            f"answer{note}. *(cut off)*: the answer ran to `max_new_tokens` without ending.",
            "",
        ]
        shown: dict[str, int] = {}
        for (kind, pid), group in by_prompt.items():
            if shown.get(kind, 0) >= NUM_SAMPLES:
                continue
            shown[kind] = shown.get(kind, 0) + 1
            head, rule = ("| model | answer | P(better than " + anchor + ") |", "|---|---|---|") if verdict else (
                "| model | answer |", "|---|---|")  # fmt: skip
            lines += [f"**{kind} prompt `{pid}`:** {cell(group['prompt'])}", "", head, rule]
            for m in labels:
                r = group.get(m)
                text = cell(r["response"]) + (" *(cut off)*" if r.get("finished") is False else "") if r else "-"
                p = "-" if m == anchor else fmt(verdict.get((kind, pid, m)))
                lines.append(f"| {m} | {text} |" + (f" {p} |" if verdict else ""))
            lines.append("")
        return lines

    def configs(self) -> list[str]:
        """The pipeline's config and every stage's saved LightningCLI config, collapsed."""
        lines: list[str] = []
        files = [self.run / "pipeline.yaml"] if (self.run / "pipeline.yaml").exists() else []
        for stage in (*STAGES, "eval"):
            if (self.run / stage).is_dir():
                files += sorted(p for p in (self.run / stage).rglob("config.yaml") if "hf" not in p.parts)
        if not files:
            return ["No config found (no `pipeline.yaml`, no stage `config.yaml`).", ""]
        for f in files:
            lines += details(f"<code>{f.relative_to(self.run)}</code>", "yaml", f.read_text(encoding="utf-8"))
        if self.eval:
            lines += details("evaluation settings", "json", json.dumps(self.eval.get("settings", {}), indent=2))
        return lines


WIN_RATES_EXPLAINED = (
    "**How to read these numbers.** Every pair of models answers the same held-out prompt, and the feedback model "
    "is asked which answer is better, once with each answer shown as option (A): P(row better) is the mean of the "
    "two orders, which cancels a preference for a position. The *soft win rate* (the first number in each cell) "
    "is the mean of P(row better) over the prompts. The *hard win rate* (in brackets) is the share of prompts "
    "where P(row better) was above 0.5 (exactly 0.5 counts half): it counts which side the feedback model leaned "
    "to, not by how much. Elo is fitted (Bradley-Terry) to the soft probabilities, relative to the first model; "
    "+200 Elo is a 76% soft win rate. So Elo can be flat while the hard win rates look lopsided: a feedback model "
    "that answers near 0.5 on every pair (it cannot tell the answers apart) gives Elo near 0 for every model, "
    "even when, say, 0.501 against 0.499 on most prompts makes a hard win rate of 0.75."
)
"""The paragraph in front of the evaluation's tables."""


def near_chance_note(s: dict, labels: list[str]) -> list[str]:
    """A note when every soft win rate of the prompt set ``s`` lies within ``NEAR_CHANCE`` of 0.5."""
    rates = [s["win_rate"][a][b] for a in labels for b in labels if a != b and s["win_rate"][a].get(b) is not None]
    if not rates:
        return []
    spread = max(abs(r - 0.5) for r in rates)
    if spread >= NEAR_CHANCE:
        return []
    return [
        f"Every soft win rate here lies within {spread:.3f} of 0.5: the feedback model barely prefers either "
        "answer, so the Elo differences and the hard win rates below say little about the models.",
        "",
    ]


def details(summary: str, lang: str, text: str) -> list[str]:
    """A collapsed ``<details>`` block holding ``text`` as a fenced code block."""
    body = text.rstrip().replace("```", "ʼʼʼ")  # a fence inside the text would end the block
    return [f"<details><summary>{summary}</summary>", "", f"```{lang}", body, "```", "", "</details>", ""]


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` (figures in ``run_dir/report/``) and return its path.

    A section whose inputs cannot be read is replaced by a one-line note naming the error, so one bad file never
    costs the whole report.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"report: {run}: no such run directory")
    rep = Report(run)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"# Constitutional AI run report: `{run.name}`", "", f"Run directory `{run}`, report written {stamp}.", ""]
    sections = (rep.summary, rep.curves, rep.labels, rep.evaluation, rep.samples, rep.configs)
    for section in sections:
        title = SECTION_TITLES[section.__name__]
        lines += [f"## {title}", ""]
        try:
            lines += section()
        except Exception as e:  # a damaged file must not cost the rest of the report
            print(f"report: section {title!r} failed: {e!r}", file=sys.stderr)
            lines += [f"Could not be built: `{type(e).__name__}: {e}`.", ""]
        lines.append("")
    path = run / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def main(run_dir: str = "runs/demo") -> str:
    """Write a Markdown report of a pipeline run: curves, labels, calibration, win rates, samples and configs.

    Args:
        run_dir: The run directory of ``cai pipeline`` (or one laid out like it).

    Returns:
        The path of ``report.md``.
    """
    path = write_report(run_dir)
    print(f"report: wrote {path} (figures in {path.parent / 'report'})")
    return str(path)
