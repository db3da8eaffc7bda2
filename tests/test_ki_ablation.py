"""The ablation runner end to end at toy size: two arms, one seed, a few steps. It checks the pipeline (data,
training, every measure, the report, resuming), not the science."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "ki_ablation"))

import run as ablation  # noqa: E402
from drift import linear_cka  # noqa: E402
from language_probe import group_scenes, score  # noqa: E402

from lerobot_ki.cli import make_vlm_corpus  # noqa: E402
from lerobot_ki.stats import wilson_interval  # noqa: E402

TASK = "button-press-topdown-v3"
LANGUAGE_TASK = "reach-v3"  # recorded and evaluated in its language-following variant


def test_wilson_interval_brackets_the_rate_and_narrows_with_n():
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi
    lo2, hi2 = wilson_interval(50, 100)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] > 0.2  # 0 of 10 does not prove a 0% rate


def test_cheap_rendering_keeps_the_task_and_renders_small():
    """Same physics and state as LeRobot's standard env at the same seed; only the pixels change."""
    from lerobot.envs.metaworld import MetaworldEnv

    from lerobot_ki.metaworld_render import cheap_rendering

    kind = "pixels_agent_pos"
    standard = MetaworldEnv(task=TASK, obs_type=kind)
    cheap = cheap_rendering(
        MetaworldEnv(task=TASK, obs_type=kind, observation_width=32, observation_height=32), 32
    )
    a, _ = standard.reset(seed=1000)
    b, _ = cheap.reset(seed=1000)
    assert b["pixels"].shape == (32, 32, 3) and a["pixels"].shape == (480, 480, 3)
    np.testing.assert_array_equal(a["agent_pos"], b["agent_pos"])
    action = np.array([0.3, -0.2, 0.5, 1.0], dtype=np.float32)
    for _ in range(5):
        a, ra, *_ = standard.step(action)
        b, rb, *_ = cheap.step(action)
    np.testing.assert_array_equal(a["agent_pos"], b["agent_pos"])
    assert ra == rb
    assert cheap._env.model.light_castshadow.sum() == 0 and standard._env.model.light_castshadow.sum() > 0
    with pytest.raises(ValueError, match="observation space"):
        cheap_rendering(MetaworldEnv(task=TASK), 32)  # a 480 px observation space cannot carry 32 px frames


def test_language_tasks_look_the_same_when_rendered_cheaply():
    """The evaluation's envs (cheap rendering + the language-following variant): reach, push and
    pick-place give the same first frame at a seed, so only the instruction tells them apart."""
    from lerobot_ki.metaworld_language import LANGUAGE_TASKS, make_language_following
    from lerobot_ki.metaworld_render import make_cheap_metaworld_envs

    envs = make_cheap_metaworld_envs(",".join(LANGUAGE_TASKS), 1, 96, adjust=make_language_following)
    frames = [vec.reset(seed=[1000])[0]["pixels"][0] for group in envs.values() for vec in group.values()]
    assert len(frames) == 3 and frames[0].std() > 5  # a real image, not a blank one
    assert all(np.array_equal(frames[0], f) for f in frames[1:])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, list[str]]:
    corpus = tmp_path_factory.mktemp("vqa") / "corpus"
    assert (
        make_vlm_corpus.main(
            [
                "--output_dir",
                str(corpus),
                "--tasks",
                TASK,
                "--heldout_tasks",
                "1",
                "--train_episodes",
                "1",
                "--heldout_episodes",
                "1",
                "--frames_per_episode",
                "2",
                "--heldout_frames_per_episode",
                "2",
                "--resolution",
                "96",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path_factory.mktemp("ablation")
    argv = [
        "--arms",
        "ki,frozen",
        "--seeds",
        "0",
        "--steps",
        "4",
        "--checkpoints",
        "2",
        "--batch-size",
        "4",
        "--demos-per-task",
        "1",
        "--heldout-demos-per-task",
        "1",
        "--probe-scenes",
        "2",
        "--eval-episodes",
        "1",
        "--eval-max-steps",
        "20",
        "--vqa-limit",
        "4",
        "--tasks",
        f"{TASK},{LANGUAGE_TASK}",
        "--corpus",
        str(corpus),
        "--output-dir",
        str(out),
    ]
    assert ablation.main(argv) == 0
    return out, argv


def test_every_run_has_every_measure(experiment):
    out, _ = experiment
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"ki", "frozen"}
    for arm in ("ki", "frozen"):
        (r,) = results["runs"][arm]
        assert r["success"]["n"] == 2 and set(r["success"]["per_task"]) == {TASK, LANGUAGE_TASK}
        lang = r["success"]["per_task"][LANGUAGE_TASK]
        assert len(lang["tasks_done"]) == len(lang["other_task"]) == 1  # one list per episode
        assert "tasks_done" not in r["success"]["per_task"][TASK]
        assert [p["step"] for p in r["mse_curve"]] == [2, 4]
        assert all(np.isfinite(p["mse"]) and p["mse"] > 0 for p in r["mse_curve"])
        assert set(r["vqa"]) == {"heldout_scenes", "heldout_tasks"}
        assert all(0.0 <= v <= 1.0 for v in r["vqa"].values())
        assert r["losses"] and "loss_flow" in r["losses"][-1]
    runs = results["runs"]
    # The frozen backbone does not move at all; KI's backbone learns from the FAST CE.
    assert runs["frozen"][0]["backbone_shift"] == 0.0
    assert runs["ki"][0]["backbone_shift"] > 0.0
    # ... so the frozen backbone computes the pretrained features exactly (CKA 1), and KI's do not.
    frozen, ki = runs["frozen"][0]["drift"], runs["ki"][0]["drift"]
    assert abs(frozen["hidden"]) < 1e-9 and all(abs(d) < 1e-9 for d in frozen["kv_per_layer"])
    assert ki["hidden"] > 1e-6 and ki["kv"] > 1e-6 and len(ki["kv_per_layer"]) == 4  # tiny: 4 layers
    # The language probe: 2 scenes x 3 instructions x 4 samples scored, from the recorded probe scenes.
    for arm in ("ki", "frozen"):
        probe = runs[arm][0]["language"]
        assert sum(map(sum, probe["confusion"])) == 2 * 3 * 4 and 0.0 <= probe["accuracy"] <= 1.0
        assert len(probe["instructions"]) == 3 and probe["change_across_samples"] > 0
    # ... and the frozen arm's VQA answers are the pretrained VLM's, exactly.
    before = json.loads((out / "vqa_pretrained.json").read_text())["scores"]
    after = json.loads((out / "runs" / "frozen" / "seed0" / "vqa.json").read_text())["scores"]
    assert [v["predictions"] for v in after.values()] == [v["predictions"] for v in before.values()]
    table = (out / "table.md").read_text()
    assert "| ki | 1 |" in table and "| frozen | 1 |" in table and "pretrained VLM" in table
    assert (out / "retention.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert (out / "language.png").stat().st_size > 0
    # Only the final checkpoint is kept.
    assert [
        d.name
        for d in (out / "runs" / "ki" / "seed0" / "train" / "checkpoints").iterdir()
        if d.name.isdigit()
    ] == ["000004"]


def test_language_probe_scores_chance_for_a_policy_deaf_to_the_instruction():
    """The probe's null and its ceiling: the same chunk under every instruction is nearest to exactly one
    task's expert chunk (accuracy 1/3); the instructed expert's chunk scores 1; the next task's scores 0."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(5, 3, 6, 4, generator=g)  # (scenes, tasks, T, D)
    pads = torch.zeros(5, 3, 6, dtype=torch.bool)
    pads[0, 1, 4:] = True  # a short episode: its padding is not scored
    deaf = (targets.mean(1) + 0.1 * torch.randn(2, 5, 6, 4, generator=g))[None].expand(3, 2, 5, 6, 4)
    r = score(deaf, targets, pads)
    assert r["accuracy"] == pytest.approx(1 / 3) and r["change_across_instructions"] == 0.0
    assert r["change_across_samples"] > 0
    oracle = targets.permute(1, 0, 2, 3)[:, None].expand(3, 2, 5, 6, 4).clone()  # (I, K, S, T, D)
    oracle[1, :, 0, 4:] = 99.0  # wrong only where the instructed expert's chunk is padding
    r = score(oracle, targets, pads)
    assert r["accuracy"] == 1.0 and r["mse_instructed"] == 0.0 and r["mse_other"] > 0
    assert r["confusion"] == [[10, 0, 0], [0, 10, 0], [0, 0, 10]] and r["change_across_samples"] == 0.0
    r = score(oracle.roll(1, dims=0), targets, pads)  # instruction i gets task i-1's chunk
    assert r["accuracy"] == 0.0 and r["confusion"][1] == [10, 0, 0]


def test_language_probe_refuses_scenes_that_the_image_alone_tells_apart():
    frame = torch.rand(3, 8, 8)

    def item(task: str, image: torch.Tensor) -> dict:
        return {
            "task": task,
            "observation.image": image,
            "observation.state": torch.zeros(4),
            "action": torch.zeros(6, 4),
            "action_is_pad": torch.zeros(6, dtype=torch.bool),
        }

    tasks = ["Reach", "Push", "Pick"]
    obs, targets, pads = group_scenes([item(t, frame.clone()) for t in tasks], tasks)
    assert obs["observation.image"].shape == (1, 3, 8, 8) and targets.shape == (1, 3, 6, 4)
    with pytest.raises(ValueError, match="differ in \\['observation.image'\\].*--no-videos"):
        group_scenes([item("Reach", frame), item("Push", frame + 0.01), item("Pick", frame)], tasks)
    with pytest.raises(ValueError, match="same number of scenes"):
        group_scenes([item("Reach", frame), item("Push", frame)], tasks)


def test_linear_cka_sees_through_rotation_and_scale_only():
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.standard_normal((200, 16)))
    q, _ = torch.linalg.qr(torch.from_numpy(g.standard_normal((16, 16))))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-12)  # same features, other basis
    assert linear_cka(x, x[:, :8]) < 0.9  # half the features gone
    assert linear_cka(x, torch.from_numpy(g.standard_normal((200, 16)))) < 0.2  # unrelated


def test_rerun_skips_finished_runs(experiment, capsys):
    out, argv = experiment
    result = out / "runs" / "ki" / "seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    assert ablation.main(argv) == 0
    assert result.stat().st_mtime_ns == stamp
    assert "done already" in capsys.readouterr().out


def test_another_fast_vocabulary_in_the_same_output_dir_is_refused_before_any_work(experiment):
    """Runs fine-tuned against one FAST tokenizer must not be continued (or reported) as another's."""
    out, argv = experiment
    fitted = out / "fast_tokenizer" / "tokenizer.json"
    stamp = fitted.stat().st_mtime_ns
    with pytest.raises(SystemExit, match="FAST vocabulary of 1024, not --fast-vocab 256"):
        ablation.main([*argv, "--fast-vocab", "256"])
    assert fitted.stat().st_mtime_ns == stamp


def test_a_run_killed_after_an_intermediate_checkpoint_is_not_done(tmp_path):
    ckpts = tmp_path / "train" / "checkpoints"
    (ckpts / "000150" / "pretrained_model").mkdir(parents=True)
    (ckpts / "last").symlink_to(ckpts / "000150")  # what lerobot-train leaves after the first save
    assert not ablation.training_done(tmp_path / "train", 600)
    (ckpts / "000600" / "pretrained_model").mkdir(parents=True)
    assert ablation.training_done(tmp_path / "train", 600)


def test_a_failed_stage_raises_in_the_runner(tmp_path):
    """The run at hand must stop with the stage's log tail (a worker then exits non-zero)."""
    with pytest.raises(RuntimeError, match="exit 3") as err:
        ablation.run([sys.executable, "-c", "print('the reason'); raise SystemExit(3)"], tmp_path / "s.log")
    assert "the reason" in str(err.value)


def test_unknown_arm_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown arm"):
        ablation.main(["--arms", "ki,jiont", "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_reference_arm_that_cannot_take_the_chunk_is_refused_before_any_work(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match="--arms diffusion: n_action_steps 16 does not fit"):
        ablation.main(["--arms", "ki,diffusion", "--n-action-steps", "16", "--output-dir", str(out)])
    assert not out.exists()


def test_heldout_errors_separate_sampling_spread_from_model_error(experiment):
    """evaluate.py --heldout-samples: several sampled chunks per held-out frame; the first is exactly the
    single-sample error the runs report (samples=1), and the error of their mean is no larger than their
    mean error."""
    sys.path.insert(0, str(REPO / "examples" / "metaworld"))
    from evaluate import heldout_chunk_errors

    out, _ = experiment
    ckpt = out / "runs" / "ki" / "seed0" / "train" / "checkpoints" / "last" / "pretrained_model"
    heldout, repo_id = out / "data" / "heldout", f"{ablation.REPO_ID}_heldout"
    errors = heldout_chunk_errors(ckpt, heldout, repo_id, samples=3)
    assert errors["mse"] == heldout_chunk_errors(ckpt, heldout, repo_id)["mse"]  # one sample, as runs report
    assert errors["mse_per_seed"][0] == errors["mse"] and len(set(errors["mse_per_seed"])) == 3
    assert errors["spread"] > 0  # a flow policy's samples differ
    assert errors["mse_of_mean"] <= np.mean(errors["mse_per_seed"])
