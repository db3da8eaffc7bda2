"""The VQA corpus from Meta-World scenes, the backbone pretraining on it, the PaliGemma export and the
retention measure (`lerobot-ki-make-vlm-corpus`, `-pretrain-vlm`, `-eval-vlm`): pipeline and formats at a
toy size, not the accuracy a full run reaches (README "Something to insulate")."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lerobot_ki.cli import eval_vlm, make_vlm_corpus, pretrain_vlm
from lerobot_ki.model_inputs import ModelInputs
from lerobot_ki.scene_questions import (
    LEFT_RIGHT_MARGIN,
    TASK_OBJECTS,
    SceneFacts,
    grid_cell,
    loc_tokens,
    normalize_answer,
    questions_for,
)
from lerobot_ki.vlm_accuracy import VQARecord, score

TRAIN_TASK = "drawer-open-v3"
RESOLUTION = 48


def _facts(**kw) -> SceneFacts:
    base = dict(
        task=TRAIN_TASK,
        hand_xyz=(0.0, 0.6, 0.30),
        object_xyz=(0.1, 0.7, 0.10),
        hand_xy_image=(0.2, 0.1),
        object_xy_image=(0.8, 0.9),
        gripper_opening=1.0,
    )
    base.update(kw)
    return SceneFacts(**base)


# --- questions from facts ---------------------------------------------------------------------------------
def test_answers_follow_the_facts():
    qa = {q.type: q for q in questions_for(_facts())}
    assert qa["objects"].answer == "a drawer"
    assert qa["gripper_location"].answer == "row 1, column 2"  # x 0.2, y 0.1 on the 8 x 8 grid
    assert qa["object_location"] == qa["object_location"].__class__(
        "object_location", "Where is the handle?", "row 8, column 7"
    )
    assert qa["left_right"].answer == "left"  # hand x 0.2 < object x 0.8
    assert qa["above_below"].answer == "above"  # 0.30 m vs 0.10 m
    assert qa["gripper_state"].answer == "open"
    assert qa["distance"].answer == "far"  # 0.3 m apart
    flipped = {
        q.type: q.answer
        for q in questions_for(
            _facts(hand_xy_image=(0.9, 0.5), hand_xyz=(0.1, 0.7, 0.0), gripper_opening=0.1)
        )
    }
    assert flipped["left_right"] == "right" and flipped["above_below"] == "below"
    assert flipped["gripper_state"] == "closed" and flipped["gripper_location"] == "row 5, column 8"
    assert flipped["distance"] == "near"  # 0.1 m


def test_ambiguous_relations_and_off_image_points_are_not_asked():
    types = {
        q.type
        for q in questions_for(
            _facts(
                hand_xy_image=(0.8 - LEFT_RIGHT_MARGIN / 2, 0.5),
                hand_xyz=(0.1, 0.7, 0.11),
                object_xy_image=(0.8, 1.2),
                gripper_opening=0.65,
            )
        )
    }
    assert types == {"objects", "gripper_location", "distance"}


def test_location_formats():
    assert grid_cell((0.0, 0.0)) == "row 1, column 1" and grid_cell((0.999, 0.5)) == "row 5, column 8"
    assert loc_tokens((0.5, 0.25)) == "<loc0256><loc0512>"  # y first, 1024 bins
    qa = {q.type: q.answer for q in questions_for(_facts(), loc_format="paligemma")}
    assert qa["gripper_location"] == loc_tokens((0.2, 0.1))
    with pytest.raises(ValueError, match="No object names"):
        questions_for(_facts(task="hand-insert-v3"))
    with pytest.raises(ValueError, match="loc_format"):
        questions_for(_facts(), loc_format="xy")


def test_heldout_tasks_are_new_scenes_with_known_words():
    held = make_vlm_corpus.heldout_task_rule(8, seed=0)
    assert held == make_vlm_corpus.heldout_task_rule(8, seed=0) and len(held) == 8
    assert not set(held) & set(make_vlm_corpus.ROBOT_TASKS)
    train = [t for t in TASK_OBJECTS if t not in held]
    for task in held:
        assert any(TASK_OBJECTS[t][0] == TASK_OBJECTS[task][0] for t in train), task
        assert any(TASK_OBJECTS[t][1] == TASK_OBJECTS[task][1] for t in train), task


def test_scoring_counts_and_reference_rates():
    recs = [VQARecord(Path("x.png"), "Where?", a, "loc") for a in ("top left", "top left", "middle center")]
    recs.append(VQARecord(Path("x.png"), "Open?", "open", "state"))
    report = score(recs, ["Top left.", "bottom", "middle center", "closed"])
    assert (report.scores["loc"].correct, report.scores["loc"].n) == (2, 3)
    assert report.scores["loc"].blind == pytest.approx(2 / 3)  # "top left" is the prompt's majority
    assert report.scores["loc"].uniform == pytest.approx(1 / 2)
    assert report.scores["all"].accuracy == pytest.approx(2 / 4)
    assert normalize_answer("  Top  Left. ") == "top left"


# --- the corpus, rendered -----------------------------------------------------------------------------------
def _corpus_args(out: Path) -> list[str]:
    return [
        "--output_dir", str(out), "--tasks", TRAIN_TASK, "--heldout_tasks", "1", "--train_episodes", "2",
        "--heldout_episodes", "1", "--frames_per_episode", "2", "--heldout_frames_per_episode", "2",
        "--resolution", str(RESOLUTION), "--workers", "1", "--no-progress",
    ]  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa") / "corpus"
    assert make_vlm_corpus.main(_corpus_args(out)) == 0
    return out


def test_corpus_layout_is_what_the_vlm_reader_takes(corpus):
    from lerobot_ki.vlm_data import VLMColumns, open_vlm_source, parse_record

    meta = json.loads((corpus / "corpus.json").read_text())
    assert meta["tasks"]["train"] == [TRAIN_TASK] and len(meta["tasks"]["heldout_tasks"]) == 1
    for split in make_vlm_corpus.SPLITS:
        source, base = open_vlm_source(str(corpus / split), "image", None, "train", False)
        records = [source[i] for i in range(len(source))]
        assert sum(sum(c.values()) for c in meta["answers"][split].values()) == len(records)
        for rec in records:
            ex = parse_record(rec, VLMColumns(), base)
            assert tuple(ex.images[0].shape) == (3, RESOLUTION, RESOLUTION)
            assert rec["type"] in meta["question_types"] and ex.answer
        scenes = json.loads((corpus / split / "scenes.json").read_text())
        assert {s["image"] for s in scenes} == {r["image"] for r in records}
    # every training image gets the question types that always apply
    train = [json.loads(x) for x in (corpus / "train" / "corpus.jsonl").read_text().splitlines()]
    assert len({r["image"] for r in train}) == 4
    for image in {r["image"] for r in train}:
        assert {"objects", "distance"} <= {r["type"] for r in train if r["image"] == image}


def test_same_command_same_bytes_and_no_overwrite(corpus, tmp_path):
    again = tmp_path / "again"
    assert make_vlm_corpus.main(_corpus_args(again)) == 0
    assert _digest(again) == _digest(corpus)
    assert make_vlm_corpus.main(_corpus_args(again)) == 2  # exists: refused, untouched
    assert _digest(again) == _digest(corpus)


def test_projection_puts_the_camera_axis_at_the_image_centre():
    from lerobot.envs.metaworld import MetaworldEnv

    from lerobot_ki.metaworld_scenes import CAMERA, project

    env = MetaworldEnv(task=TRAIN_TASK, camera_name=CAMERA)
    env._ensure_env()
    sim = env._env
    import mujoco

    mujoco.mj_forward(sim.model, sim.data)
    cid = mujoco.mj_name2id(sim.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA)
    pos, rot = sim.data.cam_xpos[cid], sim.data.cam_xmat[cid].reshape(3, 3)
    ahead = pos - rot[:, 2]  # cameras look along -z
    assert project(sim.model, sim.data, CAMERA, ahead, flipped=False) == pytest.approx((0.5, 0.5))
    right_up = ahead + 0.1 * rot[:, 0] + 0.1 * rot[:, 1]
    x, y = project(sim.model, sim.data, CAMERA, right_up, flipped=False)
    assert x > 0.5 and y < 0.5
    assert project(sim.model, sim.data, CAMERA, right_up, flipped=True) == pytest.approx((1 - x, 1 - y))
    env.close()


# --- pretraining, export, reload, retention --------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vlm") / "run"
    args = ["--corpus", str(corpus), "--output_dir", str(out), "--max_steps", "12", "--batch_size", "8",
            "--warmup_steps", "2", "--eval_every", "6", "--log_every", "2", "--no-progress"]  # fmt: skip
    assert pretrain_vlm.main(args) == 0
    return out


def test_pretraining_writes_a_report_a_log_and_a_plot(pretrained):
    report = json.loads((pretrained / "report.json").read_text())
    assert report["steps"] == 12 and report["resolution"] == RESOLUTION
    log = [json.loads(x) for x in (pretrained / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]  # the answer CE falls
    assert [r["step"] for r in log if "eval_accuracy" in r] == [6, 12]
    for split in pretrain_vlm.HELDOUT_SPLITS:
        assert report["splits"][split]["scores"]["all"]["n"] == len(report["splits"][split]["predictions"])
    assert (pretrained / "curves.png").stat().st_size > 0 and "| **all** |" in (
        pretrained / "accuracy.md"
    ).read_text()


def test_export_is_a_transformers_paligemma_with_our_logits(pretrained):
    """transformers' own PaliGemma forward on the exported folder gives the next-token logits the ki_vla
    backbone gives: the checkpoint is PaliGemma, not a look-alike."""
    from transformers import PaliGemmaForConditionalGeneration

    folder = pretrained / "paligemma"
    hf, info = PaliGemmaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched keys
    policy, tokenizer = eval_vlm.load_for_eval(str(folder), "cpu")
    torch.manual_seed(0)
    image = torch.rand(1, 3, RESOLUTION, RESOLUTION)
    prompt = tokenizer.encode_text("Where is the gripper?\n", bos=True)
    n_img = (RESOLUTION // hf.config.vision_config.patch_size) ** 2
    ids = torch.tensor([[hf.config.image_token_index] * n_img + prompt])
    inputs = ModelInputs(
        [image * 2 - 1],
        [torch.ones(1, dtype=torch.bool)],
        torch.tensor([prompt]),
        torch.ones(1, len(prompt), dtype=torch.bool),
        torch.zeros(1, 0),
    )
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=image * 2 - 1, token_type_ids=torch.zeros_like(ids)).logits[
            0, -1
        ]
        hidden, _ = policy.model.prefill(*policy.model.embed_prefix(inputs))
        ours = policy.model.paligemma_with_expert.lm_logits(hidden)[0, -1]
    text_rows = policy.model.layout.text_vocab_size
    torch.testing.assert_close(ours[:text_rows], theirs[:text_rows], atol=1e-5, rtol=1e-5)


def test_paligemma_pretrained_path_reproduces_the_pretraining_answers(pretrained, corpus, tmp_path):
    """The retention command on the saved folder (loaded through --policy.paligemma_pretrained_path, as
    lerobot-train loads it) gives the very answers, hence the accuracy, the pretraining run measured."""
    out = tmp_path / "scores.json"
    data = ",".join(str(corpus / s) for s in pretrain_vlm.HELDOUT_SPLITS)
    assert eval_vlm.main(["--checkpoint", str(pretrained / "paligemma"), "--data", data, "--json", str(out),
                          "--no-progress"]) == 0  # fmt: skip
    measured = json.loads(out.read_text())["scores"]
    report = json.loads((pretrained / "report.json").read_text())["splits"]
    for split in pretrain_vlm.HELDOUT_SPLITS:
        assert measured[str(corpus / split)] == report[split]


def test_loaded_backbone_keeps_text_rows_and_leaves_fast_rows_fresh(pretrained):
    from lerobot_ki.configuration_ki import KIConfig
    from lerobot_ki.modeling_ki import KIPolicy
    from lerobot_ki.weights import load_paligemma_backbone

    folder = pretrained / "paligemma"
    policy, _ = eval_vlm.load_for_eval(str(folder), "cpu")
    saved = pretrain_vlm.build_policy("tiny", RESOLUTION, seed=0)  # same seed: same fresh FAST rows
    report = load_paligemma_backbone(saved, saved.config, folder)
    assert any("(FAST ids) keep their init" in n for n in report.notes)
    emb = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    rows = policy.model.layout.text_vocab_size
    assert torch.equal(policy.state_dict()[emb][:rows], saved.state_dict()[emb][:rows])
    assert policy.state_dict()[emb].shape[0] == rows + policy.config.fast_vocab_size
    # A PaliGemma-vocabulary tokenizer on this byte-vocabulary checkpoint is refused, naming the fix.
    cfg = KIConfig(
        paligemma_variant="tiny",
        action_expert_variant="tiny",
        text_tokenizer=str(folder),
        image_resolution=(RESOLUTION, RESOLUTION),
        paligemma_pretrained_path=str(folder),
    )
    cfg.input_features = dict(policy.config.input_features)
    with pytest.raises(ValueError, match="text_tokenizer"):
        KIPolicy(cfg)
