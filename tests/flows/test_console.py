"""What a person sees: the console's lines and bars, the stages' plain lines and events, the artifacts' layout."""

from __future__ import annotations

import io
import json
import re

import pytest

from flows.artifacts import evaluation_markdown, stage_markdown, stage_summary, verdict
from flows.console import Console, bar, clock, duration, progress_text
from flows.stages import failure_reason, stage_exit_code
from tasks import stage_io

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # any control character but newline and tab


def ppo_record(step: int, total: int = 60) -> dict:
    return {
        "stage": "ppo",
        "event": "progress",
        "step": step,
        "total": total,
        "objective/scores": 1.2345,
        "objective/kl": 2.0,
        "eps": 60.0,
        "ppo/loss/total": 0.1,
    }


def test_durations_clocks_and_bars_by_hand() -> None:
    assert [duration(s) for s in (4.25, 42.4, 185, 3725)] == ["4.2 s", "42 s", "3 min 05 s", "1 h 02 min"]
    assert [clock(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]
    assert bar(0.5, 10) == "━━━━━─────" and bar(0.55, 10) == "━━━━━╸────" and bar(1.0, 4) == "━━━━"
    # 30 of 60 in 40 s: as long again to go; the key numbers of PPO only
    assert progress_text(ppo_record(30), 40.0, with_bar=False) == (
        "30/60   50% · RM score 1.23 · KL 2 · episodes/s 60 · 0:40, about 0:40 left"
    )


def test_without_a_terminal_progress_is_a_plain_line_per_quarter_and_has_no_control_characters() -> None:
    out = io.StringIO()
    screen = Console(stream=out, tty=False)
    screen.stage_started("ppo", 6, 8, ".rlhf/logs/ppo.log")
    for step in range(1, 61):
        screen.event(ppo_record(step))
    screen.stage_finished("RM score 1.43 · KL 2.42", ["models/policy"], skipped=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines  # start, 15/60, 30/60, 45/60, summary
    assert [line.split()[1] for line in lines[1:4]] == ["15/60", "30/60", "45/60"]
    assert lines[0].startswith("[6/8] ppo") and "log .rlhf/logs/ppo.log" in lines[0]
    assert re.fullmatch(r"\[6/8\] ppo +done in [0-9.]+ s · RM score 1.43 · KL 2.42 → models/policy", lines[4])
    assert not CONTROL.search(out.getvalue()) and "git" not in out.getvalue()


def test_in_a_terminal_the_bar_redraws_in_place_and_the_summary_replaces_it(monkeypatch) -> None:
    out = io.StringIO()
    screen = Console(stream=out, tty=True)
    monkeypatch.setattr("flows.console.REDRAW_EVERY_S", 0.0)
    screen.stage_started("ppo", 6, 8, "log")
    screen.event(ppo_record(1))
    screen.event(ppo_record(2))
    screen.stage_finished("", [], skipped=False)
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3  # two redraws and the clear before the summary line
    assert "━" in text and "2/60" in text and text.endswith("\n") and "done in" in text.splitlines()[-1]


def test_verbose_never_redraws_and_a_failure_names_its_reason_and_log() -> None:
    assert Console(stream=io.StringIO(), tty=True, verbose=True).tty is False  # Prefect prints log lines in between
    out = io.StringIO()
    screen = Console(stream=out, tty=False)
    screen.stage_started("label", 4, 8, ".rlhf/logs/label.log")
    tail = "Running stage 'label':\nerror: data/pairs/samples.jsonl: row 2: missing field 'responses'. Fix: …\n"
    screen.stage_failed(2, failure_reason(tail + "ERROR: failed to reproduce 'label'"), ".rlhf/logs/label.log")
    lines = out.getvalue().splitlines()
    assert "FAILED" in lines[1] and "(exit 2)" in lines[1] and ".rlhf/logs/label.log" in lines[1]
    assert lines[2].strip().startswith("error: data/pairs/samples.jsonl: row 2") and "failed to reproduce" in lines[3]


def test_each_stage_shows_its_own_key_numbers() -> None:
    fields = {"train/loss": 0.59, "eval/loss": 0.56, "eval/accuracy": 0.73}  # the reward loop's
    assert stage_io.key_numbers({"stage": "reward", **fields}) == "loss 0.59 · eval accuracy 0.73"
    assert stage_io.key_numbers({"stage": "sft", **fields}) == "loss 0.59 · eval loss 0.56"
    dpo = {"stage": "ppo", "dpo/loss": 0.6, "dpo/accuracy": 0.7, "dpo/rewards/margin": 0.25}  # DPO runs as ppo
    assert stage_io.key_numbers(dpo) == "loss 0.6 · accuracy 0.7 · margin 0.25"


def test_a_failed_stage_reports_its_program_s_exit_code_not_dvc_s() -> None:
    tail = "error: …\nERROR: failed to reproduce 'label': failed to run: python -m tasks.label --pairs …, exited with 2"
    assert stage_exit_code(255, tail) == 2 and stage_exit_code(255, "killed") == 255 and stage_exit_code(1, tail) == 1


def test_stage_summaries_lead_with_the_key_results() -> None:
    assert stage_summary("sft", {"eval_loss_initial": 6.0615, "eval_loss": 1.5694, "steps": 1000}) == (
        "eval loss 6.06 → 1.57"
    )
    evaluation = {
        "gold_win_rate": 0.9394,
        "gold_win_rate_ci_low": 0.912,
        "gold_win_rate_ci_high": 0.96,
        "kl_to_ref": 2.42,
        "valid_rate_policy": 0.998,
        "valid_rate_sft": 0.942,
    }
    assert stage_summary("evaluate", evaluation) == (
        "gold win rate 0.939 [0.912, 0.96] · KL 2.42 · validity 0.998 (SFT 0.942)"
    )
    assert stage_summary("unknown", {"x": 1.0}) == ""


def test_the_evaluation_artifact_leads_with_the_verdict_then_groups(tmp_path) -> None:
    evaluation = {
        "gold_win_rate": 0.94,
        "gold_win_rate_ci_low": 0.91,
        "gold_win_rate_ci_high": 0.96,
        "gold_gain_in_sft_std": 1.38,
        "kl_to_ref": 2.42,
        "kl_target_band": [2.0, 6.0],
        "kl_in_target_band": True,
        "valid_rate_policy": 0.998,
        "valid_rate_sft": 0.942,
        "distinct_policy": 0.06,
        "distinct_sft": 0.69,
        "rm_score_policy": 2.1,
        "rm_score_sft": 0.0,
    }
    text = evaluation_markdown(
        evaluation, {"algorithm": "grpo", "seconds": 120.0}, "## Samples\n| prompt | SFT | PPO |"
    )
    lines = text.splitlines()
    assert lines[0] == "# GRPO policy vs SFT"
    assert lines[2] == "**The policy beats SFT on the gold judge: it wins 94.0% of paired comparisons.**"
    assert "| gold win rate vs SFT | 0.94 | 95 % interval 0.91–0.96 |" in lines[6]
    assert "| KL to SFT (nats) | 2.42 | target band 2–6: inside |" in text
    order = [text.index(h) for h in ("**The policy", "## Gold judge", "## Cost", "## Health", "## Samples")]
    assert order == sorted(order)
    assert verdict({**evaluation, "gold_win_rate": 0.5, "gold_win_rate_ci_low": 0.45}).startswith("No clear difference")
    assert verdict({"gold_win_rate": 0.3, "gold_win_rate_ci_low": 0.2, "gold_win_rate_ci_high": 0.4}).startswith(
        "The policy is worse"
    )


def test_the_stage_metrics_artifact_has_the_summary_first_and_a_table_per_file() -> None:
    text = stage_markdown(
        "sft",
        {
            "metrics/sft.json": {"eval_loss_initial": 6.0, "eval_loss": 1.5},
            "dvclive/sft/metrics.json": {"train/loss": 1.49, "step": 1000},
        },
    )
    assert text.index("**eval loss 6 → 1.5**") < text.index("## metrics/sft.json") < text.index("## dvclive/sft")
    assert "| train/loss | 1.49 |" in text


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_events_go_to_the_stage_file_and_people_get_a_plain_line_per_tenth(in_tmp, capsys) -> None:
    stage_io.start_events("sft")
    for step in range(1, 101):
        stage_io.emit("sft", "progress", step=step, total=100, **{"train/loss": 2.0, "eval/loss": 2.5})
    stage_io.emit("sft", "metrics", eval_loss=1.5)
    records = stage_io.read_events("sft")
    assert [r["step"] for r in records if r["event"] == "progress"] == list(range(1, 101))
    assert records[-1]["event"] == "metrics" and records[-1]["eval_loss"] == 1.5
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sft: 1/100 · loss 2 · eval loss 2.5" and len(lines) == 12  # steps 1, 10, 20 … 100, done
    assert lines[-1] == "sft: done: eval_loss 1.5" and not any(line.startswith("{") for line in lines)
    stage_io.start_events("sft")  # the next run starts the file afresh
    assert stage_io.read_events("sft") == []


def test_a_half_written_event_line_waits_for_its_end(in_tmp) -> None:
    path = stage_io.events_file("ppo")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"event": "start"}) + "\n" + '{"event": "prog')
    tail = stage_io.EventTail(path)
    assert stage_io.read_events("ppo") == [{"event": "start"}] and tail.read() == [{"event": "start"}]
    with open(path, "a") as events:
        events.write('ress"}\n')
    assert tail.read() == [{"event": "progress"}] and tail.read() == []


def test_the_training_log_writes_dvclive_curves_and_rewrites_them_after_a_resume(in_tmp) -> None:
    log = stage_io.TrainingLog("ppo", in_tmp / "dvclive/ppo")
    for step in (3, 4):  # a resumed run logs only the iterations after its checkpoint
        log({"step": step, "total": 4, "objective/kl": 0.1 * step, "eps": 2.0})
    curve = in_tmp / "dvclive/ppo/plots/metrics/objective/kl.tsv"
    assert curve.read_text().splitlines()[1:] == ["3\t0.30000000000000004", "4\t0.4"]
    log.rewrite([{"step": s, "total": 4, "objective/kl": 0.1 * s, "eps": 2.0} for s in (1, 2, 3, 4)])
    assert [line.split("\t")[0] for line in curve.read_text().splitlines()] == ["step", "1", "2", "3", "4"]
    summary = json.loads((in_tmp / "dvclive/ppo/metrics.json").read_text())
    assert summary == {"objective": {"kl": 0.4}, "eps": 2.0, "step": 4}
    assert [r["step"] for r in stage_io.read_events("ppo", event="progress")] == [3, 4]
    other_rank = stage_io.TrainingLog("ppo", in_tmp / "dvclive/other", main_process=False)
    other_rank({"step": 1, "total": 4, "eps": 1.0})
    assert not (in_tmp / "dvclive/other").exists()
