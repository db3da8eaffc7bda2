"""The main job's console and report, without running the job: flag pass-through to lerobot-train, the
condensed progress view, the streamed logs, the summary's counts and intervals, the listed outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("main_job_console", ROOT / "examples/metaworld/main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


main_job = _load()


def test_unknown_policy_and_dataset_flags_go_to_lerobot_train_and_replace_ours():
    args = main_job.parse_args(
        ["--preset", "real", "--policy.text_tokenizer=/m/tok", "--policy.max_state_dim=32",
         "--dataset.video_backend=pyav"]
    )  # fmt: skip
    assert args.preset == "real"
    assert args.train_extra == ["--policy.text_tokenizer=/m/tok", "--policy.max_state_dim=32",
                                "--dataset.video_backend=pyav"]  # fmt: skip
    cmd = main_job.train_command(args, "local/x", Path("/d"), Path("/f"), Path("/t"), log_freq=10)
    assert cmd[0].endswith("lerobot-train")
    assert cmd[-3:] == args.train_extra
    assert "--policy.max_state_dim=8" not in cmd and cmd.count("--policy.max_state_dim=32") == 1
    assert "--policy.max_action_dim=8" in cmd  # not overridden: ours stays
    assert all(flag in cmd for flag in main_job.PRESETS["real"])
    assert "--dataset.root=/d" in cmd and "--steps=1200" in cmd


@pytest.mark.parametrize("bad", [["--stepz", "3"], ["--policy.text_tokenizer"], ["--env.type=aloha"]])
def test_other_unknown_flags_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        main_job.parse_args(bad)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_progress_condenses_training_lines_and_tqdm_bars():
    shown, now = [], [0.0]
    progress = main_job.Progress(
        "train", Path("/o/train.log"), total_steps=1200, min_interval=15.0, heartbeat=60.0,
        write=shown.append, clock=lambda: now[0],
    )  # fmt: skip
    progress.feed("INFO 2026-11-27 02:00:00 ot_train.py:420 Creating dataset")
    progress.feed(
        "INFO 2026-11-27 02:01:00 ot_train.py:470 step:1K smpl:16K ep:80 epch:8.00 loss:0.612 grdn:1.2 "
        "lr:1.0e-03 updt_s:0.410 data_s:0.01 loss_fast_ce:0.52 loss_flow:0.09 fast_token_acc:0.89"
    )
    assert len(shown) == 1
    assert "step 1K/1200" in shown[0] and "loss_fast_ce 0.52" in shown[0] and "loss_flow 0.09" in shown[0]
    assert "smpl" not in shown[0]
    progress.feed("episodes:  10%|#         | 2/20 [00:10<01:30,  5.0s/ep]")
    progress.feed("episodes:  15%|#5        | 3/20 [00:12<01:30,  5.0s/ep]")  # within 15 s: not shown
    now[0] = 20.0
    progress.feed("episodes:  20%|##        | 4/20 [00:20<01:20,  5.0s/ep]")
    progress.feed("Running rollout with at most 500 steps:  3%|3  | 15/500 [00:02<01:00]")  # never shown
    progress.feed("episodes: 100%|##########| 20/20 [01:40<00:00,  5.0s/ep]")  # finished: always shown
    assert [s.split("] ", 1)[1] for s in shown[1:]] == ["episodes 2/20", "episodes 4/20", "episodes 20/20"]
    now[0] = 200.0
    progress.tick()
    assert "still running" in shown[-1] and "/o/train.log" in shown[-1]


def test_progress_shows_only_the_bars_named():
    shown = []
    progress = main_job.Progress("record", Path("/o/r.log"), bars=("episodes",), min_interval=0.0,
                                 write=shown.append)  # fmt: skip
    progress.feed("Map: 100%|##########| 46/46 [00:00<00:00, 900 examples/s]")
    progress.feed("episodes: 100%|##########| 1/1 [00:25<00:00, 25.51s/ep]")
    assert len(shown) == 1 and shown[0].endswith("episodes 1/1")
    progress = main_job.Progress("evaluate", Path("/o/e.log"), bars=("Running rollout",), min_interval=0.0,
                                 write=shown.append)  # fmt: skip
    progress.feed(
        "\x1b[ARunning rollout with at most 500 steps:  73%|#######3  | 363/500 [04:20<01:19]\x1b[A"
    )
    assert shown[-1].endswith("Running rollout with at most 500 steps 363/500")


def test_run_streams_the_whole_output_to_the_log_and_a_summary_to_the_console(tmp_path, capsys):
    script = (
        "import sys\n"
        "for i in range(1, 4):\n"
        "    sys.stderr.write(f'\\rbatches: {i * 33}%|###| {i}/3 [00:01<00:01]'); sys.stderr.flush()\n"
        "print('noise line')\n"
        "print('INFO step:10 smpl:160 loss:1.5 loss_fast_ce:1.2 loss_flow:0.3')\n"
    )
    log = tmp_path / "stage.log"
    main_job.run([sys.executable, "-c", script], log, main_job.Progress("stage", log, min_interval=0.0))
    text = log.read_bytes().decode()
    assert "\rbatches: 33%" in text and "noise line" in text  # byte for byte, tqdm's \r included
    out = capsys.readouterr().out
    assert "batches 1/3" in out and "batches 3/3" in out and "step 10" in out and "loss_flow 0.3" in out
    shown = [line for line in out.splitlines() if line.startswith("  [stage")]
    assert len(shown) == 4 and not any("noise" in line for line in shown)
    assert f"full output: {log}" in out


def test_failed_stage_stops_with_the_log_tail(tmp_path):
    log, failing = tmp_path / "bad.log", [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"]
    with pytest.raises(SystemExit) as exc:
        main_job.run(failing, log)
    assert "exit 3" in str(exc.value) and "the reason" in str(exc.value)
    # run_stage, which the ablation runner uses, raises instead: the caller decides what a failure stops.
    with pytest.raises(RuntimeError, match="exit 3") as err:
        main_job.run_stage(failing, log)
    assert isinstance(err.value, main_job.StageError) and "the reason" in str(err.value)


def test_training_metrics_are_read_from_step_on():
    """Progress and parse_train_log read a line alike, and never the log prefix's time or file:line."""
    line = ("INFO 2026-11-27 02:17:40 ot_train.py:641 step:1K smpl:16K loss:0.61 lr:1.0e-03 "
            "train/fast_token_acc:0.9 loss_fast_ce:0.52 loss_flow:0.09")  # fmt: skip
    assert main_job._step_metrics(line) == {
        "step": "1K", "smpl": "16K", "loss": "0.61", "lr": "1.0e-03", "train/fast_token_acc": "0.9",
        "loss_fast_ce": "0.52", "loss_flow": "0.09",
    }  # fmt: skip
    assert main_job._step_metrics("INFO 2026-11-27 02:17:40 ot_train.py:420 Creating dataset") == {}
    (row,) = main_job.parse_train_log(line, log_freq=1000)
    assert row == {"step": 1000.0, "smpl": 16000.0, "loss": 0.61, "lr": 1e-3, "train/fast_token_acc": 0.9,
                   "loss_fast_ce": 0.52, "loss_flow": 0.09}  # fmt: skip


def _success(outcomes: dict[str, list[bool]]) -> dict:
    """evaluate.py's JSON for these per-task outcomes (the fields the report reads)."""
    return {"per_task": {t: {"successes": o} for t, o in outcomes.items()}}


def test_summary_gives_counts_intervals_and_checkpoints_side_by_side():
    expert = {"tasks": {"a-v3": {"attempted": 10, "successes": 10, "kept": 10}, "b-v3": {"attempted": 10,
              "successes": 9, "kept": 9}}}  # fmt: skip
    rows = [{"step": 20.0, "loss_fast_ce": 6.9, "loss_flow": 1.5}, {"step": 1200.0, "loss_fast_ce": 0.5,
            "loss_flow": 0.08, "fast_token_acc": 0.9}]  # fmt: skip
    args = main_job.parse_args(["--baseline", "act"])
    ki_ckpt, act_ckpt = Path("/o/train/checkpoints/last/pretrained_model"), Path("/o/train_act/c")
    results = {
        "ki_vla": {"checkpoint": ki_ckpt,
                   "success": _success({"a-v3": [True, False, True, True], "b-v3": [False] * 4})},
        "act": {"checkpoint": act_ckpt, "success": _success({"a-v3": [False] * 4, "b-v3": [True] * 4})},
    }  # fmt: skip
    report = main_job.format_report(["a-v3", "b-v3"], expert, results, rows, {"train": 60.0}, args)
    assert "| task | ki_vla success | act success | scripted expert success | demos |" in report
    assert "| a-v3 | 3/4 [30%, 95%] | 0/4 [0%, 49%] | 10/10 [72%, 100%] | 10 |" in report
    assert "| b-v3 | 0/4 [0%, 49%] | 4/4 [51%, 100%] | 9/10 [60%, 98%] | 9 |" in report
    assert "| **all tasks** | 3/8 [14%, 69%] | 4/8 [22%, 78%] | | |" in report
    assert f"checkpoint (ki_vla): `{ki_ckpt}`" in report and f"checkpoint (act): `{act_ckpt}`" in report
    assert "FAST CE 6.900 -> 0.500" in report


def test_outputs_list_every_video_folder(tmp_path):
    for folder in ("eval/videos/a-v3_0", "eval/videos/b-v3_0", "eval_act/videos/a-v3_0"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "eval_episode_0.mp4").write_bytes(b"")
    (tmp_path / "eval" / "videos" / "empty_0").mkdir()
    folders = main_job.video_folders([tmp_path / "eval", tmp_path / "eval_act"])
    assert [str(f.relative_to(tmp_path)) for f in folders] == [
        "eval/videos/a-v3_0", "eval/videos/b-v3_0", "eval_act/videos/a-v3_0"]  # fmt: skip
    text = main_job.format_outputs(tmp_path, {"ki_vla": tmp_path / "ckpt", "act": tmp_path / "a"}, folders)
    assert "evaluation videos (3 folders)" in text and str(folders[1]) in text
    assert str(tmp_path / "summary.md") in text and f"checkpoint (act): {tmp_path / 'a'}" in text
    assert "evaluation videos: none written" in main_job.format_outputs(tmp_path, {}, [])


def test_default_tasks_follow_the_written_rule():
    """DEFAULT_TASKS are the first N of the seeded draw from LeRobot's easy group (no task skipped)."""
    from lerobot.envs.metaworld import DIFFICULTY_TO_TASKS

    drawn = main_job.task_draw(list(DIFFICULTY_TO_TASKS["easy"]))
    assert sorted(drawn) == sorted(DIFFICULTY_TO_TASKS["easy"])  # a permutation: nothing left out
    assert main_job.DEFAULT_TASKS.split(",") == drawn[: main_job.N_DEFAULT_TASKS]
    assert main_job.task_draw(list(DIFFICULTY_TO_TASKS["easy"]), seed=1) != drawn  # the seed matters


def test_baseline_trains_lerobots_policy_on_the_same_data_and_budget():
    args = main_job.parse_args(["--baseline", "act,diffusion", "--steps", "300", "--policy.max_state_dim=32"])
    assert args.baselines == ["act", "diffusion"]
    ki = main_job.train_command(args, "local/x", Path("/d"), Path("/f"), Path("/t"), log_freq=10)
    act = main_job.baseline_train_command(args, "act", "local/x", Path("/d"), Path("/t_act"), log_freq=10)
    assert "--policy.type=act" in act and "--policy.pretrained_backbone_weights=null" in act
    assert f"--policy.chunk_size={args.chunk_size}" in act and "--policy.n_action_steps=5" in act
    # the same data, steps, batch, seed and device as ki_vla; none of ki_vla's own flags
    shared = [
        f for f in ki if f.startswith(("--dataset.", "--steps", "--batch_size", "--seed", "--policy.device"))
    ]
    assert shared and all(f in act for f in shared)
    assert "--output_dir=/t_act" in act and not any("max_state_dim" in f or "ki_vla" in f for f in act)
    diffusion = main_job.baseline_train_command(args, "diffusion", "local/x", Path("/d"), Path("/t"), 10)
    assert "--policy.noise_scheduler_type=DDIM" in diffusion and "--steps=300" in diffusion


def test_unknown_baseline_is_refused(capsys):
    with pytest.raises(SystemExit):
        main_job.parse_args(["--baseline", "act,smolvla"])
    assert "--baseline smolvla: choose from act, diffusion" in capsys.readouterr().err


def test_evaluation_runs_lerobots_loop_at_the_recorded_size():
    args = main_job.parse_args(["--eval-episodes", "7"])
    assert args.render_size == 96  # the tiny preset's image resolution
    assert main_job.parse_args(["--preset", "real"]).render_size == 224
    cmd = main_job.eval_command(args, Path("/c"), ["a-v3", "b-v3"], Path("/e"))
    assert cmd[1].endswith("examples/metaworld/evaluate.py")
    text = " ".join(cmd)
    assert "--tasks a-v3,b-v3 --episodes 7 --render-size 96 --start-seed 1000" in text
    assert "--json /e/success.json" in text and "--heldout-root" not in text
    held = " ".join(main_job.eval_command(args, Path("/c"), ["a-v3"], Path("/e"), heldout_dir=Path("/h")))
    assert f"--heldout-root /h --heldout-repo-id {main_job.HELDOUT_ID}" in held


def test_a_dataset_rendered_at_another_size_is_moved_aside_not_deleted(tmp_path, monkeypatch):
    """Old outputs (480 px, no render_size recorded) are kept under a time-stamped name; the job stops at
    the recording stage here (its command fails), after moving them."""
    out = tmp_path / "job"
    (out / "dataset" / "meta").mkdir(parents=True)
    (out / "dataset" / "meta" / "info.json").write_text("{}")
    (out / "dataset_summary.json").write_text('{"tasks": {}}')
    monkeypatch.setattr(main_job, "run", lambda *a, **k: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit):
        main_job.main(["--output-dir", str(out)])
    kept = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("dataset.") for n in kept) and any(
        n.startswith("dataset_summary.json.") for n in kept
    )
    moved = next(p for p in out.iterdir() if p.name.startswith("dataset.") and p.is_dir())
    assert (moved / "meta" / "info.json").read_text() == "{}"


def test_a_fast_tokenizer_fitted_for_another_vocabulary_is_refitted_not_reused(tmp_path, monkeypatch):
    """A FAST tokenizer left by an earlier run with FAST's usual 1024 tokens is moved aside (kept) and the
    fit stage runs again with this run's vocabulary, which training is told too."""
    out = tmp_path / "job"
    (out / "dataset" / "meta").mkdir(parents=True)
    (out / "dataset" / "meta" / "info.json").write_text("{}")
    (out / "dataset_summary.json").write_text('{"tasks": {}, "render_size": 96}')
    (out / "heldout" / "meta").mkdir(parents=True)
    (out / "heldout" / "meta" / "info.json").write_text("{}")
    (out / "fast_tokenizer").mkdir()
    (out / "fast_tokenizer" / "tokenizer.json").write_text("{}")
    (out / "fast_tokenizer" / "fast_config.json").write_text(
        '{"chunk_size": 20, "configured_vocab_size": 1024}'
    )
    calls = []

    def stop(cmd, *a, **k):
        calls.append(cmd)
        raise SystemExit("stop")

    monkeypatch.setattr(main_job, "run", stop)
    with pytest.raises(SystemExit):
        main_job.main(["--output-dir", str(out)])
    (fit,) = calls
    assert fit[0].endswith("lerobot-ki-fit-fast") and f"--vocab_size={main_job.FAST_VOCAB}" in fit
    moved = [p for p in out.iterdir() if p.name.startswith("fast_tokenizer.")]
    assert len(moved) == 1 and (moved[0] / "fast_config.json").exists()
    args = main_job.parse_args([])
    train = main_job.train_command(args, "r", Path("/d"), Path("/f"), Path("/t"), 20)
    assert f"--policy.fast_vocab_size={main_job.FAST_VOCAB}" in train
    # What the moved-aside tokenizer was fitted for, as the job reads it.
    assert main_job.fast_fit(moved[0]) == (20, 1024)


def test_diffusion_reference_flags_make_a_valid_lerobot_config_that_replans_like_ki_vla():
    """The Diffusion reference's flags, parsed by draccus into LeRobot's own DiffusionConfig (which checks
    the horizon against the U-Net's downsampling): ki_vla's replanning rate, the frames dropped by the
    rule LeRobot's config states, warm-up over a tenth of the run; an n_action_steps the horizon cannot
    hold is refused before any training."""
    import draccus
    from baselines import reference_policy_flags  # examples/metaworld, on the path main_job set
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    flags = reference_policy_flags("diffusion", chunk_size=20, n_action_steps=5, steps=600)
    assert flags[0] == "--policy.type=diffusion"
    cfg = draccus.parse(DiffusionConfig, args=[f.replace("--policy.", "--") for f in flags[1:]])
    assert cfg.horizon == 16 and cfg.n_action_steps == 5 and cfg.n_obs_steps == 2
    assert cfg.drop_n_last_frames == cfg.horizon - cfg.n_action_steps - cfg.n_obs_steps + 1 == 10
    assert tuple(cfg.down_dims) == (256, 512, 1024) and cfg.scheduler_warmup_steps == 60
    assert cfg.pretrained_backbone_weights is None and cfg.num_inference_steps == 10
    with pytest.raises(ValueError, match="at most 15"):
        reference_policy_flags("diffusion", chunk_size=20, n_action_steps=16, steps=600)


def test_a_baseline_that_cannot_take_the_jobs_chunk_is_refused_at_startup(capsys):
    with pytest.raises(SystemExit):
        main_job.parse_args(["--baseline", "act,diffusion", "--n-action-steps", "16"])
    assert "--baseline diffusion: n_action_steps 16 does not fit" in capsys.readouterr().err
    assert main_job.parse_args(["--baseline", "act", "--n-action-steps", "16"]).baselines == ["act"]
