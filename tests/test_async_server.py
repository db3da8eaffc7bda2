"""Serving ki_vla through LeRobot's async inference (gRPC PolicyServer), with LeRobot's own RobotClient.

LeRobot's server as users start it (`python -m lerobot.async_inference.policy_server`) refuses ki_vla; the
plugin's entry point (`lerobot-ki-policy-server`, lerobot_ki/cli/policy_server.py) serves it. The client is
LeRobot's RobotClient, unchanged, on the simulated robot of tests/plugins/; everything on 127.0.0.1, offline.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from rollout_setup import TASK  # (also puts tests/plugins on sys.path, for the simulated robot)
from synthetic_dataset import ACTION_DIM
from tiny_setup import build

ROOT = Path(__file__).resolve().parents[1]
ACTIONS_PER_CHUNK = 8  # fewer than the tiny policy's chunk_size (10): the server must cut the chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    """LeRobot's async modules create `logs/` in the working directory when imported: keep it out of the
    repository by importing them (and running the servers) from a scratch folder. Importing them also
    re-initializes the root logger (LeRobot's init_logging: its handlers replaced, level NOTSET); put it
    back afterwards, so that the test modules run after this one log as before."""
    work = tmp_path_factory.mktemp("async")
    before = os.getcwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    os.chdir(work)
    try:
        yield work
    finally:
        os.chdir(before)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def ckpt(workdir, dataset_root) -> Path:
    """A tiny ki_vla checkpoint (weights, config, processors) as lerobot-train saves it."""
    policy, pre, post, _ = build(dataset_root)
    path = workdir / "pretrained_model"
    policy.save_pretrained(path)
    pre.save_pretrained(path)
    post.save_pretrained(path)
    return path


def make_client(workdir: Path, ckpt: Path, port: int):
    """LeRobot's RobotClient for the simulated robot (its config as `robot_client` would parse it)."""
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient
    from lerobot_robot_ki_testbot import KITestBotConfig

    cfg = RobotClientConfig(
        policy_type="ki_vla",
        pretrained_name_or_path=str(ckpt),
        robot=KITestBotConfig(log_path=str(workdir / f"robot_{port}.jsonl")),
        actions_per_chunk=ACTIONS_PER_CHUNK,
        task=TASK,
        server_address=f"127.0.0.1:{port}",
        policy_device="cpu",
    )
    return RobotClient(cfg)


def wait_ready(
    port: int, server: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 120
) -> None:
    """Until the server accepts connections. gRPC's reconnect backoff grows to 2 minutes by default; capped
    at 0.2 s here, a server still importing (tens of seconds on a loaded CPU) is not waited on for longer."""
    backoff = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=backoff) as channel:
        ready = grpc.channel_ready_future(channel)
        while True:
            if server is not None and server.poll() is not None:
                pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                ready.result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise


@pytest.fixture(scope="module")
def lerobot_server(workdir, offline_env) -> Iterator[tuple[int, subprocess.Popen, Path]]:
    """LeRobot's server started as its docs say, with nothing of the plugin imported. Started before the
    checkpoint is built (the tests ask for this fixture first): its imports take ~17 s of CPU meanwhile."""
    port = free_port()
    module = "lerobot.async_inference.policy_server"
    cmd = [sys.executable, "-m", module, "--host=127.0.0.1", f"--port={port}"]
    log = workdir / "lerobot_server.log"  # a file, not a pipe nobody reads while the server runs
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=workdir, env=offline_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield port, server, log
    finally:
        server.kill()
        server.wait(timeout=30)


def test_lerobots_own_server_rejects_ki_vla(lerobot_server, workdir, ckpt):
    """Today's deployment: LeRobot's own server refuses the policy type by name (its allow-list)."""
    from lerobot.transport import services_pb2

    port, server, log = lerobot_server
    wait_ready(port, server, log)
    client = make_client(workdir, ckpt, port)
    try:
        client.stub.Ready(services_pb2.Empty())
        setup = services_pb2.PolicySetup(data=pickle.dumps(client.policy_config))
        with pytest.raises(grpc.RpcError) as err:
            client.stub.SendPolicyInstructions(setup, timeout=60)
        details = err.value.details()
        assert "Policy type ki_vla not supported" in details, details
        assert "'pi05'" in details and "ki_vla'" not in details, details  # the allow-list it printed
        assert client.start() is False  # RobotClient.start() gives up on it the same way
    finally:
        client.stop()


@pytest.fixture(scope="module")
def ki_server(workdir) -> Iterator[int]:
    """`lerobot-ki-policy-server --host=127.0.0.1 --port=N`, run in-process (a thread), so that a test can
    seed the noise the server's flow sampler draws. LeRobot's serve() blocks until its gRPC server
    terminates and does not return it: the test records the server it creates in order to stop it."""
    from lerobot_ki.cli import policy_server as entry

    created: list[grpc.Server] = []
    real_server = grpc.server

    def recording_server(*args, **kwargs) -> grpc.Server:
        created.append(real_server(*args, **kwargs))
        return created[-1]

    port = free_port()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            entry.main(["--host=127.0.0.1", f"--port={port}"])
        except BaseException as e:  # SystemExit from a flag draccus refuses too: the test reports it
            errors.append(e)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpc, "server", recording_server)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            wait_ready(port, timeout=60)
        except grpc.FutureTimeoutError:
            pytest.fail(f"lerobot-ki-policy-server did not start: {errors!r}")
    try:
        yield port
    finally:
        created[0].stop(grace=None)
        thread.join(timeout=30)
        assert not thread.is_alive(), "serve() did not return after its gRPC server stopped"
        assert not errors, errors


def direct_chunk(ckpt: Path, raw_obs: dict, seed: int) -> torch.Tensor:
    """The same checkpoint and observation without the server: KIPolicy.from_pretrained, its saved
    processors, the batch layout of the dataset (state (1, D), images (1, 3, H, W) in [0, 1], task list)."""
    from lerobot.policies import make_pre_post_processors

    from lerobot_ki.modeling_ki import KIPolicy

    policy = KIPolicy.from_pretrained(ckpt)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(ckpt))
    state = [raw_obs[f"j{i}.pos"] for i in range(4)]
    batch = {
        "observation.state": torch.tensor([state], dtype=torch.float32),
        "task": [TASK],
        **{
            f"observation.images.{cam}": torch.from_numpy(raw_obs[cam]).permute(2, 0, 1)[None].float() / 255
            for cam in ("top", "wrist")
        },
    }
    torch.manual_seed(seed)
    return post(policy.predict_action_chunk(pre(batch)))[0]


def test_entry_point_serves_ki_vla_to_lerobots_robot_client(workdir, ckpt, ki_server):
    from lerobot.async_inference.helpers import TimedObservation
    from lerobot.transport import services_pb2

    client = make_client(workdir, ckpt, ki_server)
    try:
        # LeRobot's client code end to end: handshake, policy instructions (policy_type="ki_vla": the
        # server loads the checkpoint), one observation of the robot, then the action chunk.
        assert client.start() is True
        raw_obs = client.robot.get_observation()
        raw_obs["task"] = TASK
        obs = TimedObservation(timestamp=time.time(), timestep=0, observation=raw_obs, must_go=True)
        assert client.send_observation(obs) is True
        torch.manual_seed(1234)  # the server samples its noise from this process's generator
        reply = client.stub.GetActions(services_pb2.Empty(), timeout=120)
    finally:
        client.stop()
    # The server answers Empty (no data) when inference raised: its log says why.
    assert len(reply.data) > 0, "the server returned no actions; see its log in " + str(workdir / "logs")
    timed_actions = pickle.loads(reply.data)  # nosec: our own server, on 127.0.0.1
    assert [a.get_timestep() for a in timed_actions] == list(range(ACTIONS_PER_CHUNK))
    actions = torch.stack([a.get_action() for a in timed_actions])
    assert actions.shape == (ACTIONS_PER_CHUNK, ACTION_DIM), actions.shape
    assert torch.isfinite(actions).all()
    # The served chunk is the checkpoint's own output for that observation: run directly (its processors
    # included, so unnormalized as the server's postprocessor does) with the same noise, it is the same.
    expected = direct_chunk(ckpt, raw_obs, seed=1234)[:ACTIONS_PER_CHUNK]
    torch.testing.assert_close(actions, expected, atol=1e-5, rtol=1e-5)
    # Another seed gives other actions: the equality above is not two constant outputs agreeing.
    assert not torch.allclose(direct_chunk(ckpt, raw_obs, seed=99)[:ACTIONS_PER_CHUNK], actions, atol=1e-3)


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lerobot-ki-policy-server"] == "lerobot_ki.cli.policy_server:main"
