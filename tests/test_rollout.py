"""`lerobot-rollout` with a ki_vla checkpoint, end to end on CPU: the real CLI, control loop, inference
engines (sync and Real-Time Chunking) and recording strategies, driving the simulated robot of
tests/plugins/ (motors that follow the commands, cameras that draw the joints). Offline (conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import CHUNK_SIZE, TRAIN_STEPS, run_logged, venv_script
from rollout_setup import (
    FPS,
    TASK,
    jumps,
    load_recording,
    plugin_env,
    rollout_cmd,
    run_rollout,
    wait_for_actions,
)
from synthetic_dataset import ACTION_DIM, IMAGE_SIZE, STATE_DIM

# RTC for these 10-step chunks: guide toward the whole leftover, re-plan when 8 actions remain.
RTC_ARGS = [
    "--inference.type=rtc",
    f"--inference.rtc.execution_horizon={CHUNK_SIZE}",
    "--inference.queue_threshold=8",
]
NO_RETURN = "--return_to_initial_position=false"


@pytest.fixture(scope="module")
def env(offline_env, tmp_path_factory) -> dict[str, str]:
    return plugin_env(offline_env, tmp_path_factory.mktemp("plugin_dist"))


@pytest.fixture(scope="module")
def ckpt(train_run):
    return train_run.pretrained


@pytest.fixture(scope="module")
def sync_sentry(ckpt, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_sentry")
    # Video, as on a real robot (sentry forces streaming encoding).
    cmd = rollout_cmd(ckpt, out, "--strategy.type=sentry", "--dataset.video=true", NO_RETURN, duration=6)
    return run_rollout(cmd, env, out)


@pytest.fixture(scope="module")
def rtc_sentry(ckpt, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtc_sentry")
    cmd = rollout_cmd(ckpt, out, "--strategy.type=sentry", "--dataset.video=false", NO_RETURN, *RTC_ARGS)
    return run_rollout(cmd, env, out)


def check_rate(run) -> None:
    """Commands arrive at the configured rate, from the first one on (that first tick also pays for the
    first inference and the video encoders' start-up): a steady period and no long gaps."""
    times = run.command_times()
    assert len(times) >= 2 * FPS, (len(times), run.tail())
    period = np.median(np.diff(times))
    assert abs(period - 1 / FPS) < 0.1 / FPS, (period, run.tail())
    assert len(times) - 1 >= 0.7 * FPS * (times[-1] - times[0]), (len(times), times[-1] - times[0])


def check_recording(run, n_episodes: int = 1) -> None:
    """The dataset loads, has the robot's features, and its actions are the commands the robot got."""
    ds = load_recording(run.out)
    assert ds.num_episodes == n_episodes, ds.num_episodes
    assert ds.features["action"]["shape"] == (ACTION_DIM,)
    assert ds.features["observation.state"]["shape"] == (STATE_DIM,)
    for cam in ("top", "wrist"):
        assert ds.features[f"observation.images.{cam}"]["shape"] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    frame = ds[len(ds) - 1]
    assert frame["observation.images.top"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert frame["task"] == TASK
    recorded = np.stack([ds.hf_dataset[i]["action"] for i in range(len(ds))])
    sent = run.commands()[: len(recorded)]
    np.testing.assert_allclose(recorded, sent, atol=1e-5)


# --- sync and RTC --------------------------------------------------------------------------------------


def test_sync_sentry_drives_robot_at_rate_and_records(sync_sentry):
    run = sync_sentry
    assert run.returncode == 0, run.tail()
    assert "SyncInferenceEngine started" in run.log
    check_rate(run)
    check_recording(run)
    assert len(load_recording(run.out)) == len(run.commands())  # every tick that moved the robot is kept
    events = run.events
    assert events[0]["event"] == "connect" and events[-1]["event"] == "disconnect"
    # Closed loop: the robot moved, its state followed the commands.
    assert np.abs(np.array(events[-1]["pos"])).max() > 1e-3


def test_rtc_sentry_runs_at_rate_and_joins_chunks_smoothly(rtc_sentry, sync_sentry):
    run = rtc_sentry
    assert run.returncode == 0, run.tail()
    assert "RTC inference thread started" in run.log and "RTC inference error" not in run.log, run.tail()
    check_rate(run)
    check_recording(run)
    # Sync starts a fresh chunk (fresh noise) every n_action_steps; RTC guides each new chunk toward the
    # actions already committed. The checkpoint is barely trained (every step is noisy), which makes the
    # difference plain: typical jumps are smaller, and past the first second (LeRobot's RTC engine has no
    # latency estimate for its first re-plans and skips actions by a guessed delay) none exceeds sync's.
    rtc, sync = jumps(run.commands()), jumps(sync_sentry.commands())
    assert np.percentile(rtc, 90) < np.percentile(sync, 90), (rtc, sync)
    assert rtc[FPS:].max() <= sync.max(), (rtc, sync)


def test_rtc_guides_the_flow_sampler_toward_the_committed_prefix(ckpt):
    """The call LeRobot's RTC engine makes (and supports_rtc_inference checks the signature of):
    predict_action_chunk(batch, inference_delay=..., prev_chunk_left_over=...)."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.rtc.configuration_rtc import RTCConfig
    from lerobot.rollout.inference.rtc import supports_rtc_inference

    from lerobot_ki.modeling_ki import KIPolicy

    policy = KIPolicy.from_pretrained(ckpt)
    pre, _ = make_pre_post_processors(policy.config, pretrained_path=str(ckpt))
    assert supports_rtc_inference(policy)
    g = torch.Generator().manual_seed(0)
    obs = {
        "observation.images.top": torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "observation.images.wrist": torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "observation.state": torch.zeros(1, STATE_DIM),
        "task": [TASK],
    }
    batch = pre(obs)
    torch.manual_seed(1)
    prev = policy.predict_action_chunk(batch)[0]  # (T, A) the chunk being executed
    delay, executed = 2, 3  # 3 actions ran during the last inference; 2 more will run during this one
    leftover = prev[executed:]  # (T - 3, A), what the RTC queue hands back

    torch.manual_seed(2)
    unguided = policy.predict_action_chunk(batch)[0]
    policy.config.rtc_config = RTCConfig(execution_horizon=CHUNK_SIZE)
    policy.init_rtc_processor()
    torch.manual_seed(2)  # same noise: only the guidance differs
    guided = policy.predict_action_chunk(batch, inference_delay=delay, prev_chunk_left_over=leftover)[0]
    assert guided.shape == unguided.shape == (CHUNK_SIZE, ACTION_DIM)

    # The frozen steps (those that run while this chunk is computed) reproduce the committed actions...
    err_guided = (guided[:delay] - leftover[:delay]).abs().max()
    err_unguided = (unguided[:delay] - leftover[:delay]).abs().max()
    assert err_guided < 0.1 * err_unguided, (err_guided, err_unguided)
    # ...so switching chunks after `delay` steps does not jump (vs. switching to an unguided chunk).
    join_guided = (guided[delay] - leftover[delay - 1]).abs().max()
    join_unguided = (unguided[delay] - leftover[delay - 1]).abs().max()
    assert join_guided < join_unguided, (join_guided, join_unguided)

    policy.config.inference_mode = "fast"
    assert not supports_rtc_inference(policy)


@pytest.fixture(scope="module")
def trained_rtc_ckpt(dataset_root, offline_env, tiny_train_args, tmp_path_factory):
    """`lerobot-train` with training-time RTC (the flag through LeRobot's CLI), otherwise the session's
    checkpoint run (same steps, batch, seed and data), so its rollout compares with the guided one's."""
    work = tmp_path_factory.mktemp("train_rtc")
    args = [
        "--batch_size=4",
        f"--steps={TRAIN_STEPS}",
        f"--save_freq={TRAIN_STEPS}",
        "--log_freq=5",
        "--seed=1000",
    ]
    cmd = [
        venv_script("lerobot-train"),
        *tiny_train_args(dataset_root, work / "run", *args, "--policy.rtc_training_max_delay=3"),
    ]
    log = run_logged(cmd, offline_env, work / "train.log")
    assert "loss_flow" in log
    return work / "run" / "checkpoints" / f"{TRAIN_STEPS:06d}" / "pretrained_model"


@pytest.fixture(scope="module")
def trained_rtc_sentry(trained_rtc_ckpt, env, tmp_path_factory):
    """The guided rollout's command line (`rtc_sentry`), with the training-time RTC checkpoint."""
    out = tmp_path_factory.mktemp("rtc_trained")
    cmd = rollout_cmd(
        trained_rtc_ckpt, out, "--strategy.type=sentry", "--dataset.video=false", NO_RETURN, *RTC_ARGS
    )
    return run_rollout(cmd, env, out)


def test_rtc_rollout_of_a_training_time_rtc_checkpoint_inpaints(trained_rtc_ckpt, trained_rtc_sentry):
    """lerobot-rollout --inference.type=rtc with a checkpoint trained with rtc_training_max_delay: the
    policy inpaints the committed actions (its one-time log line) instead of LeRobot's guidance, and the
    loop runs at rate and records as with guided RTC."""
    assert json.loads((trained_rtc_ckpt / "config.json").read_text())["rtc_training_max_delay"] == 3
    run = trained_rtc_sentry
    assert run.returncode == 0, run.tail()
    assert "RTC inference thread started" in run.log and "RTC inference error" not in run.log, run.tail()
    assert "Training-time RTC (rtc_training_max_delay=3): inpainting" in run.log, run.tail()
    check_rate(run)
    check_recording(run)


@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-11-27: trained-RTC tick jumps p90 2.02 / max 2.93 vs guided 1.05 / 1.09 (300 "
    "steps: 0.93 / 1.56 vs 0.59 / 0.71; 1500 steps: 0.70 / 1.09 vs 0.64 / 0.82, "
    "benchmarks/rtc_smoothness.py). A barely trained tiny model's chunks are noisy step to step; "
    "guidance smooths the whole chunk toward the leftover, inpainting fixes only its first d actions.",
)
def test_training_time_rtc_joins_chunks_at_least_as_smoothly_as_guided_rtc(trained_rtc_sentry, rtc_sentry):
    """The issue's bar for training-time RTC: chunk joins at least as smooth as guided RTC's, by the
    measure of the guided test above (tick-to-tick jumps at the 90th percentile and, past the first
    second, the largest), both checkpoints trained alike (same steps, batch, seed, data; only D differs)
    and rolled out with the same command line. Strict: when it starts passing, the marker must go."""
    assert trained_rtc_sentry.returncode == 0 and rtc_sentry.returncode == 0
    trained, guided = jumps(trained_rtc_sentry.commands()), jumps(rtc_sentry.commands())
    assert np.percentile(trained, 90) <= np.percentile(guided, 90), (trained, guided)
    assert trained[FPS:].max() <= guided[FPS:].max(), (trained, guided)


def test_inference_mode_fast_refuses_rtc_clearly_and_runs_sync(ckpt, env, tmp_path):
    out = tmp_path / "rtc"
    refused = run_rollout(
        rollout_cmd(ckpt, out, "--strategy.type=sentry", "--policy.inference_mode=fast", *RTC_ARGS), env, out
    )
    assert refused.returncode != 0
    assert "use --policy.inference_mode=flow with --inference.type=rtc" in refused.log, refused.tail()
    assert "RTC inference is not supported" in refused.log
    assert not refused.of("connect"), "the robot must not be touched when the configuration is refused"

    ok = run_rollout(
        rollout_cmd(
            ckpt,
            tmp_path / "sync",
            "--strategy.type=sentry",
            "--dataset.video=false",
            "--policy.inference_mode=fast",
            NO_RETURN,
            duration=3,
        ),
        env,
        tmp_path / "sync",
    )
    assert ok.returncode == 0, ok.tail()
    assert len(ok.commands()) > 0
    check_recording(ok)


# --- the other recording strategies ------------------------------------------------------------------


def test_episodic_rtc_records_two_episodes_with_reset_between(ckpt, env, tmp_path):
    cmd = rollout_cmd(
        ckpt,
        tmp_path,
        "--strategy.type=episodic",
        "--dataset.video=false",
        "--dataset.num_episodes=2",
        "--dataset.episode_time_s=2",
        "--dataset.reset_time_s=0.5",
        NO_RETURN,
        *RTC_ARGS,
        duration=0,
    )
    run = run_rollout(cmd, env, tmp_path)
    assert run.returncode == 0, run.tail()
    ds = load_recording(tmp_path)
    assert ds.num_episodes == 2
    lengths = [int(ds.meta.episodes["length"][i]) for i in range(2)]
    assert all(n >= 0.6 * FPS * 2 for n in lengths), lengths
    # Between episodes (no teleop) LeRobot brings the robot back to where it started: all zeros.
    assert any(np.abs(c).max() == 0.0 for c in run.commands()[lengths[0] :]), run.tail()


def test_highlight_saves_the_ring_buffer_on_keypress(ckpt, env, tmp_path):
    """The save key ('s'), typed into the terminal LeRobot reads keys from, flushes the ring buffer
    and starts live recording; the second 's' saves the episode."""
    import pty

    master, slave = pty.openpty()

    def press_s_twice(proc: subprocess.Popen, robot_log) -> None:
        wait_for_actions(robot_log, 20, proc)  # ~2 s in the ring buffer
        os.write(master, b"s")
        wait_for_actions(robot_log, 30, proc)  # ~1 s live
        os.write(master, b"s")

    cmd = rollout_cmd(
        ckpt,
        tmp_path,
        "--strategy.type=highlight",
        "--strategy.ring_buffer_seconds=5",
        "--dataset.video=true",
        NO_RETURN,
        duration=5,
    )
    try:
        run = run_rollout(cmd, env, tmp_path, while_running=press_s_twice, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert run.returncode == 0, run.tail()
    assert "Flushing ring buffer" in run.log and "Episode saved" in run.log, run.tail()
    ds = load_recording(tmp_path)
    assert ds.num_episodes == 1
    assert len(ds) >= 25, len(ds)  # the buffered ~2 s plus the live second
    check_recording(run)  # the buffer held everything since the start: the first commands, in order


# --- faults on the robot path ------------------------------------------------------------------------


def test_late_then_missing_camera_frame_stops_robot_and_keeps_data(ckpt, env, tmp_path):
    cmd = rollout_cmd(
        ckpt,
        tmp_path,
        "--strategy.type=sentry",
        "--dataset.video=false",
        "--robot.late_frame_at=8",
        "--robot.late_frame_s=0.5",
        "--robot.missing_frame_at=25",
        duration=30,
    )
    run = run_rollout(cmd, env, tmp_path)
    # A camera that delivers nothing is an error LeRobot propagates (exit != 0), after its cleanup.
    assert run.returncode != 0 and "delivered no frame" in run.log, run.tail()
    # It stopped at the fault, long before the 30 s duration (robot time: process start-up under load
    # is not the rollout's to answer for).
    assert run.events[-1]["t"] - run.events[0]["t"] < 25, run.tail()
    late, missing = run.of("late_frame")[0]["t"], run.of("missing_frame")[0]["t"]
    assert len(run.commands(before=missing)) - len(run.commands(before=late)) >= 10  # went on after it
    # Everything recorded up to the fault is on disk and loads.
    ds = load_recording(tmp_path)
    assert len(ds) == len(run.commands(before=missing)) >= 20
    recorded = np.stack([ds.hf_dataset[i]["action"] for i in range(len(ds))])
    np.testing.assert_allclose(recorded, run.commands(before=missing), atol=1e-5)
    # Then the robot was brought back to its start pose and released.
    events = run.events
    assert events[-1]["event"] == "disconnect"
    assert np.abs(np.array(events[-1]["pos"])).max() < 0.05, events[-1]


def test_policy_error_under_sync_stops_robot_and_keeps_data(ckpt, env, tmp_path):
    """A NaN joint reading: the ki_vla preprocessor refuses it inside the control loop, which stops; the
    frames before it are saved and the arm is released where it was."""
    cmd = rollout_cmd(
        ckpt,
        tmp_path,
        "--strategy.type=sentry",
        "--dataset.video=false",
        "--robot.nan_state_at=15",
        duration=30,
    )
    run = run_rollout(cmd, env, tmp_path)
    assert run.returncode != 0 and "contains NaN or Inf" in run.log, run.tail()
    # It stopped at the fault, long before the 30 s duration (robot time: process start-up under load
    # is not the rollout's to answer for).
    assert run.events[-1]["t"] - run.events[0]["t"] < 25, run.tail()
    first_nan = next(e["t"] for e in run.of("obs") if e["i"] == 15)
    ds = load_recording(tmp_path)
    # Observation 0 is LeRobot's start-pose reading; 1..14 drove the robot and were recorded.
    assert len(ds) == len(run.commands(before=first_nan)) == 14
    # LeRobot's return-to-start plans from the joint readings, which are broken: the robot refuses the
    # non-finite move, LeRobot warns, and the arm holds its last commanded target until released.
    assert "Could not return to initial position" in run.log, run.tail()
    events = run.events
    assert events[-1]["event"] == "disconnect"
    last_policy_pos = [e["pos"] for e in run.of("action") if e["t"] < first_nan][-1]
    assert events[-1]["pos"] == last_policy_pos


def test_policy_error_under_rtc_holds_last_action_then_stops(ckpt, env, tmp_path):
    """A NaN joint reading makes every policy call raise. LeRobot's RTC thread retries, the robot
    executes what was already queued and then gets no new command (it holds its last target); after
    the retries the rollout shuts down by itself and keeps the recording."""
    cmd = rollout_cmd(
        ckpt,
        tmp_path,
        "--strategy.type=sentry",
        "--dataset.video=false",
        "--robot.nan_state_at=20",
        NO_RETURN,
        *RTC_ARGS,
        duration=40,
    )
    run = run_rollout(cmd, env, tmp_path)
    assert "contains NaN or Inf" in run.log and "Fatal error in RTC thread" in run.log, run.tail()
    # It shut down by itself, well before the 40 s duration (robot time, connect to disconnect: process
    # start-up on a loaded machine took ~35 s of wall time and is not the rollout's to answer for).
    assert run.events[-1]["t"] - run.events[0]["t"] < 35, run.tail()
    first_nan = next(e["t"] for e in run.of("obs") if e["i"] == 20)
    after = run.commands()[len(run.commands(before=first_nan)) :]
    assert len(after) <= CHUNK_SIZE, len(after)  # only the actions computed before the fault
    assert run.events[-1]["event"] == "disconnect"
    ds = load_recording(tmp_path)
    assert len(ds) == len(run.commands()) >= 20


def test_keyboard_interrupt_stops_cleanly_keeps_data_and_returns_robot(ckpt, env, tmp_path):
    sent: dict[str, float] = {}

    def interrupt(proc: subprocess.Popen, robot_log) -> None:
        wait_for_actions(robot_log, 15, proc)
        sent["t"] = time.monotonic()
        proc.send_signal(signal.SIGINT)

    cmd = rollout_cmd(ckpt, tmp_path, "--strategy.type=sentry", "--dataset.video=false", duration=60)
    run = run_rollout(cmd, env, tmp_path, while_running=interrupt)
    assert run.returncode == 0, run.tail()
    assert "Shutdown signal" in run.log, run.tail()
    ds = load_recording(tmp_path)
    assert 15 <= len(ds) <= len(run.commands(before=sent["t"])) + 2
    events = run.events
    assert events[-1]["event"] == "disconnect"
    assert np.abs(np.array(events[-1]["pos"])).max() < 0.05, events[-1]
