"""End-to-end tests of `--policy.type=ki_vla` through LeRobot itself: `lerobot-train`, resume, loading a
checkpoint, a rollout loop, and what a Hub push would upload. CPU only, offline (see conftest.py)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (
    CHUNK_SIZE,
    LOG_FREQ,
    N_ACTION_STEPS,
    SAVE_FREQ,
    TRAIN_STEPS,
    logged_metric,
    logged_steps,
    run_logged,
)
from safetensors import safe_open
from safetensors.torch import load_file
from synthetic_dataset import ACTION_DIM, IMAGE_SIZE, STATE_DIM, TASKS

import lerobot_ki  # noqa: F401  (registers ki_vla and its processor steps)
from lerobot_ki.fast import FASTTokenizer
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import KIFastTokenizerStep

FAST_STATE = "policy_preprocessor_step_6_ki_vla_fast_tokenizer.safetensors"
TEXT_STATE = "policy_preprocessor_step_5_ki_vla_text_tokenizer.safetensors"


# --- helpers ------------------------------------------------------------------------------------------


def load_policy(path: Path):
    from lerobot.policies.factory import make_pre_post_processors

    policy = KIPolicy.from_pretrained(path)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path))
    return policy, pre, post


def observation(batch: int = 2, seed: int = 0, task: str = TASKS[1]) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "observation.images.top": torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "observation.images.wrist": torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "observation.state": torch.rand(batch, STATE_DIM, generator=g) * 2 - 1,
        "task": [task] * batch,
    }


def chunk(policy, pre, obs: dict, seed: int) -> torch.Tensor:
    batch = pre(dict(obs))
    torch.manual_seed(seed)
    return policy.predict_action_chunk(batch)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fast_step(pre) -> KIFastTokenizerStep:
    steps = [s for s in pre.steps if isinstance(s, KIFastTokenizerStep)]
    assert len(steps) == 1, [type(s).__name__ for s in pre.steps]
    return steps[0]


@pytest.fixture(scope="module")
def loaded(train_run):
    """The final checkpoint of the session's run, loaded once with its processors."""
    return load_policy(train_run.pretrained)


# --- 1. lerobot-train --------------------------------------------------------------------------------


def test_train_logs_both_losses_and_saves_checkpoint(train_run):
    log = train_run.log
    # Fitted once, by the preprocessor that owns it (the policy does not fit a copy of its own).
    assert log.count("FAST fitted on local/ki_synthetic") == 1, log[-3000:]
    assert logged_steps(log) == list(range(LOG_FREQ, TRAIN_STEPS + 1, LOG_FREQ))
    for name in ("loss_fast_ce", "loss_flow", "loss"):
        values = logged_metric(log, name)
        assert len(values) == TRAIN_STEPS // LOG_FREQ, (name, values)
        assert all(math.isfinite(v) and v > 0 for v in values), (name, values)
    # The reported loss is CE + flow (both weights default to 1); the log rounds each to 3 decimals.
    for total, ce, flow in zip(
        logged_metric(log, "loss"),
        logged_metric(log, "loss_fast_ce"),
        logged_metric(log, "loss_flow"),
        strict=True,
    ):
        assert total == pytest.approx(ce + flow, abs=2e-3)

    listing = train_run.checkpoints_after_run
    assert sorted(listing) == [f"{SAVE_FREQ:06d}", f"{TRAIN_STEPS:06d}", "last"]
    assert listing["last"] == train_run.last.resolve()
    assert json.loads((train_run.last / "training_state" / "training_step.json").read_text())["step"] == 30

    pm = train_run.pretrained
    config = json.loads((pm / "config.json").read_text())
    assert config["type"] == "ki_vla"
    assert config["chunk_size"] == CHUNK_SIZE and config["paligemma_variant"] == "tiny"
    assert json.loads((pm / "train_config.json").read_text())["policy"]["type"] == "ki_vla"
    for name in (
        "model.safetensors",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
        "policy_preprocessor_step_3_normalizer_processor.safetensors",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
        FAST_STATE,
        TEXT_STATE,
    ):
        assert (pm / name).is_file() and (pm / name).stat().st_size > 0, name

    pre_cfg = json.loads((pm / "policy_preprocessor.json").read_text())
    registry_names = [s.get("registry_name") for s in pre_cfg["steps"]]
    ki_steps = {"ki_vla_input_check", "ki_vla_prompt", "ki_vla_text_tokenizer", "ki_vla_fast_tokenizer"}
    assert ki_steps <= set(registry_names)

    fast_blob = load_file(pm / FAST_STATE)["fast_tokenizer"]
    text_blob = load_file(pm / TEXT_STATE)["tokenizer_json"]
    assert fast_blob.numel() > 100 and text_blob.numel() > 100
    json.loads(bytes(text_blob.numpy()).decode("utf-8"))  # a tokenizer.json, not garbage
    # Saved once: the weights file holds no second copy of the FAST tokenizer.
    with safe_open(pm / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert names and not any("fast" in key and "tokenizer" in key for key in names)


# --- 2. resume ---------------------------------------------------------------------------------------


def test_resume_continues_from_checkpoint_without_refitting_fast(train_run, offline_env, tmp_path):
    checkpoints = train_run.output_dir / "checkpoints"
    before = {name: file_hashes(checkpoints / name) for name in ("000015", "000030")}
    total = TRAIN_STEPS + 6
    cmd = [
        sys.executable,
        "-m",
        "lerobot.scripts.lerobot_train",
        "--resume=true",
        f"--config_path={train_run.pretrained / 'train_config.json'}",
        f"--steps={total}",
        "--log_freq=2",
    ]
    log = run_logged(cmd, offline_env, tmp_path / "resume.log")

    assert "FAST fitted" not in log, "the resumed run refitted the FAST tokenizer"
    assert "Resuming data order at epoch" in log
    # Logged steps start after the checkpoint: a run restarted from 0 would log step:2 first.
    assert logged_steps(log) == [32, 34, 36]
    assert all(math.isfinite(v) for v in logged_metric(log, "loss_fast_ce") + logged_metric(log, "loss_flow"))

    new = checkpoints / f"{total:06d}"
    assert json.loads((new / "training_state" / "training_step.json").read_text())["step"] == total
    assert (checkpoints / "last").resolve() == new.resolve()
    # Nothing the first run saved was touched.
    assert {name: file_hashes(checkpoints / name) for name in before} == before
    # The tokenizers were carried over byte for byte, and the weights moved on from the checkpoint.
    for name in (FAST_STATE, TEXT_STATE):
        assert (new / "pretrained_model" / name).read_bytes() == (train_run.pretrained / name).read_bytes()
    old_w = load_file(train_run.pretrained / "model.safetensors")
    new_w = load_file(new / "pretrained_model" / "model.safetensors")
    assert old_w.keys() == new_w.keys()
    assert any(not torch.equal(old_w[k], new_w[k]) for k in old_w if old_w[k].is_floating_point())


# --- 3. loading --------------------------------------------------------------------------------------


def test_loading_twice_gives_identical_actions(train_run, loaded):
    policy_a, pre_a, post_a = loaded
    policy_b, pre_b, post_b = load_policy(train_run.pretrained)
    obs = observation(batch=2, seed=3)

    a = chunk(policy_a, pre_a, obs, seed=7)
    b = chunk(policy_b, pre_b, obs, seed=7)
    assert a.shape == (2, CHUNK_SIZE, ACTION_DIM)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.equal(post_a(a), post_b(b))
    # The seed drives the flow noise: a different seed must change the actions (or the test above is moot).
    c = chunk(policy_a, pre_a, obs, seed=8)
    assert (a - c).abs().max() > 1e-3
    # The two samples in the batch differ in state and images: their actions differ too.
    assert not torch.equal(a[0], a[1])

    # The policy's FAST tokenizer (for inference_mode=fast) is read by from_pretrained from the saved
    # preprocessor state, and tokenizes exactly as the preprocessor loaded by LeRobot's factory does.
    tok_model, tok_proc = policy_a.fast_tokenizer, fast_step(pre_a).fast_tokenizer
    assert isinstance(tok_model, FASTTokenizer) and isinstance(tok_proc, FASTTokenizer)
    assert tok_model is not tok_proc
    t = np.linspace(0, 1, CHUNK_SIZE)[None, :, None]
    rng = np.random.default_rng(0)
    chunks = np.clip(
        0.8
        * np.sin(
            2
            * np.pi
            * (t * rng.uniform(0.2, 1.0, (16, 1, ACTION_DIM)) + rng.uniform(0, 1, (16, 1, ACTION_DIM)))
        ),
        -1,
        1,
    )
    tokens = tok_model.encode(chunks)
    assert tokens == tok_proc.encode(chunks)
    assert all(len(row) > 0 for row in tokens)
    np.testing.assert_allclose(tok_model.decode(tokens), tok_proc.decode(tokens))


# --- 4. rollout --------------------------------------------------------------------------------------


class TinyEnv(gym.Env):
    """Two 32x32 RGB cameras and a 4-dim state; the action (3-dim) nudges the state."""

    metadata = {"render_modes": []}

    def __init__(self):
        image = gym.spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(
            {
                "top": image,
                "wrist": image,
                "state": gym.spaces.Box(-1.0, 1.0, (STATE_DIM,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._state = np.zeros(STATE_DIM, np.float32)

    def _obs(self):
        img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 30, np.uint8)
        x = int((self._state[0] + 1) / 2 * (IMAGE_SIZE - 8))
        img[4:12, x : x + 8] = (40, 200, 60)
        return {"top": img, "wrist": img[::-1].copy(), "state": self._state.copy()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._state = self.np_random.uniform(-1, 1, STATE_DIM).astype(np.float32)
        return self._obs(), {}

    def step(self, action):
        action = np.asarray(action, np.float32)
        assert action.shape == (ACTION_DIM,)
        self._state[:ACTION_DIM] = np.clip(self._state[:ACTION_DIM] + 0.1 * np.clip(action, -1, 1), -1, 1)
        return self._obs(), 0.0, False, False, {}


def to_batch(obs: dict, task: str) -> dict:
    def image(x):
        return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0

    return {
        "observation.images.top": image(obs["top"]),
        "observation.images.wrist": image(obs["wrist"]),
        "observation.state": torch.from_numpy(obs["state"])[None],
        "task": [task],
    }


def test_rollout_refills_queue_every_n_action_steps(loaded, monkeypatch):
    policy, pre, post = loaded
    chunks: list[torch.Tensor] = []
    original = policy.predict_action_chunk

    def counting(batch, **kwargs):
        out = original(batch, **kwargs)
        chunks.append(out.clone())
        return out

    monkeypatch.setattr(policy, "predict_action_chunk", counting)
    policy.reset()
    env = TinyEnv()
    obs, _ = env.reset(seed=0)
    steps = 12
    queue_sizes, normalized = [], []
    torch.manual_seed(0)
    for _ in range(steps):
        action_n = policy.select_action(pre(to_batch(obs, TASKS[1])))
        normalized.append(action_n)
        queue_sizes.append(len(policy._action_queue))
        action = post(action_n)
        assert action.shape == (1, ACTION_DIM)
        assert torch.isfinite(action).all()
        obs, *_ = env.step(action[0].numpy())

    assert len(chunks) == math.ceil(steps / N_ACTION_STEPS) == 3
    assert queue_sizes == [(N_ACTION_STEPS - 1 - i % N_ACTION_STEPS) for i in range(steps)]
    # Each step's action is the next one of the chunk predicted when the queue was empty.
    for i, action_n in enumerate(normalized):
        assert torch.equal(action_n, chunks[i // N_ACTION_STEPS][:, i % N_ACTION_STEPS])
    # The postprocessor unnormalizes: its output is not the normalized action.
    assert not torch.allclose(post(normalized[0]), normalized[0])

    policy.reset()
    assert len(policy._action_queue) == 0
    policy.select_action(pre(to_batch(obs, TASKS[1])))
    assert len(chunks) == 4, "after reset() the next step must predict a fresh chunk"
    policy.reset()


# --- 5. save / push content --------------------------------------------------------------------------

_FRESH_LOAD = """
import json, sys, torch
import lerobot_ki
from lerobot_ki.modeling_ki import KIPolicy
from lerobot.policies.factory import make_pre_post_processors
path, obs_file, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
policy = KIPolicy.from_pretrained(path)
pre, post = make_pre_post_processors(policy.config, pretrained_path=path)
batch = pre(torch.load(obs_file))
torch.manual_seed(seed)
actions = policy.predict_action_chunk(batch)
print("ACTIONS=" + json.dumps(actions.tolist()))
"""


def test_saved_folder_loads_in_fresh_offline_process(train_run, loaded, offline_env, tmp_path):
    policy, pre, post = loaded
    out = tmp_path / "to_push"
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)

    saved = {p.name for p in out.iterdir()}
    checkpoint = {p.name for p in train_run.pretrained.iterdir()}
    # train_config.json is written by lerobot-train (cfg.save_pretrained), not by the policy/processors.
    assert saved == checkpoint - {"train_config.json"}
    for name in saved:
        assert (out / name).read_bytes() == (train_run.pretrained / name).read_bytes(), name

    obs = observation(batch=2, seed=11)
    torch.save(obs, tmp_path / "obs.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, str(out), str(tmp_path / "obs.pt"), "5"],
        env=offline_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("ACTIONS=")]
    fresh = torch.tensor(json.loads(line[-1].removeprefix("ACTIONS=")))
    assert fresh.shape == (2, CHUNK_SIZE, ACTION_DIM)
    torch.testing.assert_close(fresh, chunk(policy, pre, obs, seed=5), atol=1e-5, rtol=1e-5)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace the Hub calls LeRobot's pushes make (create_repo, upload_folder, and the model card's
    online validation) with a capture of what `upload_folder` would send, filtered by its patterns."""
    import huggingface_hub
    from huggingface_hub.repocard import RepoCard
    from huggingface_hub.utils import filter_repo_objects

    uploads: list[dict] = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    class Commit:
        def __init__(self, url):
            self.repo_url = type("RepoUrl", (), {"url": url})()

    def create_repo(self, repo_id, **kwargs):
        assert repo_id, "create_repo called without a repo id"
        return Repo(repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        kept = list(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        dest = tmp_path / "hub" / str(len(uploads))
        for name in kept:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, dest / name)
        uploads.append({"repo_id": repo_id, "files": set(kept), "dir": dest, **kwargs})
        return Commit(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    # PreTrainedPolicy.generate_model_card() calls card.validate(), a POST to huggingface.co.
    monkeypatch.setattr(RepoCard, "validate", lambda self, repo_type=None: None)
    return uploads


def test_push_to_hub_uploads_weights_config_and_tokenizers(
    train_run, loaded, fake_hub, monkeypatch, tmp_path
):
    from lerobot.configs.train import TrainPipelineConfig

    policy, pre, post = loaded
    repo_id = "local-user/ki_vla_test"
    monkeypatch.setattr(policy.config, "repo_id", repo_id)
    cfg = TrainPipelineConfig.from_pretrained(train_run.pretrained)
    # What lerobot-train does at the end of a run with --policy.push_to_hub=true.
    policy.push_model_to_hub(cfg)
    pre.push_to_hub(repo_id)
    post.push_to_hub(repo_id)

    assert [u["repo_id"] for u in fake_hub] == [repo_id] * 3
    model_up, pre_up, post_up = fake_hub
    assert {"config.json", "model.safetensors", "train_config.json", "README.md"} == model_up["files"]
    assert pre_up["files"] == {
        "policy_preprocessor.json",
        "policy_preprocessor_step_3_normalizer_processor.safetensors",
        TEXT_STATE,
        FAST_STATE,
    }
    assert post_up["files"] == {
        "policy_postprocessor.json",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    }
    for name in (TEXT_STATE, FAST_STATE):
        assert (pre_up["dir"] / name).read_bytes() == (train_run.pretrained / name).read_bytes()
    assert json.loads((model_up["dir"] / "config.json").read_text())["type"] == "ki_vla"
    # The three uploads make up the checkpoint's pretrained_model (plus the model card).
    union = model_up["files"] | pre_up["files"] | post_up["files"]
    assert union == {p.name for p in train_run.pretrained.iterdir()} | {"README.md"}

    # The "repo" those uploads form loads and acts like the original.
    repo = tmp_path / "repo"
    for up in fake_hub:
        shutil.copytree(up["dir"], repo, dirs_exist_ok=True)
    policy_r, pre_r, _ = load_policy(repo)
    obs = observation(batch=1, seed=21)
    assert torch.equal(chunk(policy_r, pre_r, obs, seed=2), chunk(policy, pre, obs, seed=2))
