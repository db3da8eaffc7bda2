"""`lerobot-ki-make-vlm-corpus`: questions about Meta-World scenes, answered by the simulator.

    lerobot-ki-make-vlm-corpus --output_dir data/mw_vqa

renders Meta-World v3 scenes through LeRobot's Meta-World env (its camera, at the policy's resolution;
see `lerobot_ki/metaworld_scenes.py`) at random steps of the scripted experts' episodes, and writes
question/answer pairs whose answers come from the simulator state (`lerobot_ki/scene_questions.py`):
which objects are on the table, where the gripper / the task's object is, left/right and above/below
relations, whether the gripper is open, how far it is from the object.

Three splits, each a folder `--policy.vlm_dataset` reads (`corpus.jsonl` + `images/`):
- `train`: the training tasks, episode seeds `train_seed_start + k`;
- `heldout_scenes`: the same tasks, new seeds (`heldout_seed_start + k`): new object placements;
- `heldout_tasks`: tasks never seen in training (a seeded draw, see `heldout_task_rule`), new seeds.
`corpus.json` records the arguments, the tasks of each split and the answer counts per question type.
Same arguments, same bytes: every random choice is drawn from the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import random
import shutil
import sys
from collections import Counter, defaultdict
from io import BytesIO
from pathlib import Path

from lerobot_ki.scene_questions import QUESTION_TYPES, TASK_OBJECTS, SceneFacts, questions_for

SPLITS = ("train", "heldout_scenes", "heldout_tasks")
# Tasks the robot experiments act in stay in training: the corpus is about the scenes the robot will see.
ROBOT_TASKS = ("button-press-topdown-v3", "drawer-open-v3", "reach-v3", "push-v3", "pick-place-v3")
JSONL = "corpus.jsonl"
META = "corpus.json"
NOT_CONTENT = ("output_dir", "overwrite", "progress", "workers")
SCENES = "scenes.json"  # per image: the simulator facts its answers were read from


def heldout_task_rule(n: int, seed: int, keep: tuple[str, ...] = ROBOT_TASKS) -> list[str]:
    """`n` tasks drawn in a seeded order from those not in `keep`, taking a task only if what is on its
    table and the object it names still occur in some training task (so every held-out answer has been
    seen in training: held-out means new scenes, not new words)."""
    order = sorted(t for t in TASK_OBJECTS if t not in keep)
    random.Random(seed).shuffle(order)
    held: list[str] = []
    for task in order:
        if len(held) == n:
            break
        rest = [t for t in TASK_OBJECTS if t not in held and t != task]
        scene, noun = TASK_OBJECTS[task]
        if any(TASK_OBJECTS[t][0] == scene for t in rest) and any(TASK_OBJECTS[t][1] == noun for t in rest):
            held.append(task)
    return sorted(held)


def _render_job(job: tuple) -> tuple[str, str, list[tuple[str, bytes, dict]]]:
    """One (split, task): its scenes as (image name, PNG bytes, scene record). Runs in a worker."""
    from PIL import Image

    from lerobot_ki.metaworld_scenes import task_scenes

    split, task, seeds, frames, max_step, resolution = job
    out = []
    for scene in task_scenes(task, seeds, frames, max_step, resolution):
        name = f"images/{task.removesuffix('-v3')}_s{scene.seed}_t{scene.step:03d}.png"
        buf = BytesIO()
        Image.fromarray(scene.image).save(buf, format="PNG")
        record = {"image": name, "seed": scene.seed, "step": scene.step, **dataclasses.asdict(scene.facts)}
        out.append((name, buf.getvalue(), record))
    return split, task, out


def questions_of(scene: dict, loc_format: str) -> list[dict]:
    """The VQA records of one scene record (as `scenes.json` holds it): its questions and answers."""
    facts = SceneFacts(**{f.name: _tuple(scene[f.name]) for f in dataclasses.fields(SceneFacts)})
    common = {"image": scene["image"], "task": facts.task, "seed": scene["seed"], "step": scene["step"]}
    return [
        {**common, "prompt": qa.prompt, "answer": qa.answer, "type": qa.type}
        for qa in questions_for(facts, loc_format)
    ]


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def make_corpus(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"{out} is not empty: pick another --output_dir or pass --overwrite.")
        if not (out / META).is_file():
            raise FileExistsError(f"{out} holds files that are not a corpus of ours: not overwriting it.")
        shutil.rmtree(out)
    heldout = heldout_task_rule(args.heldout_tasks, args.seed)
    train_tasks = [t for t in (args.tasks.split(",") if args.tasks else TASK_OBJECTS) if t not in heldout]
    unknown = [t for t in train_tasks if t not in TASK_OBJECTS]
    if unknown:
        raise ValueError(f"Unknown or unnamed tasks {unknown}; known: {sorted(TASK_OBJECTS)}")
    train_seeds = [args.train_seed_start + k for k in range(args.train_episodes)]
    held_seeds = [args.heldout_seed_start + k for k in range(args.heldout_episodes)]
    plan = {
        "train": [(t, train_seeds, args.frames_per_episode) for t in train_tasks],
        "heldout_scenes": [(t, held_seeds, args.heldout_frames_per_episode) for t in train_tasks],
        "heldout_tasks": [(t, held_seeds, args.heldout_frames_per_episode) for t in heldout],
    }
    jobs = [
        (split, task, seeds, frames, args.max_step, args.resolution)
        for split in SPLITS
        for task, seeds, frames in plan[split]
    ]
    total = sum(len(j[2]) * j[3] for j in jobs)
    counts: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    files = {}
    for split in SPLITS:
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        files[split] = (out / split / JSONL).open("w")
    scene_facts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    bar = tqdm(total=total, desc="scenes", unit="img", disable=not args.progress)
    ctx = multiprocessing.get_context("spawn")  # each worker opens its own EGL context
    try:
        with ctx.Pool(args.workers) as pool:
            # imap keeps job order, so the files are the same whatever the number of workers.
            for split, task, scenes in pool.imap(_render_job, jobs):
                for name, png, scene in scenes:
                    (out / split / name).write_bytes(png)
                    scene_facts[split].append(scene)
                    for rec in questions_of(scene, args.loc_format):
                        files[split].write(json.dumps(rec, sort_keys=True) + "\n")
                        counts[split][rec["type"]][rec["answer"]] += 1
                bar.update(len(scenes))
                bar.set_postfix(split=split, task=task)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    for split in SPLITS:  # not *.jsonl: the VLM reader takes every *.jsonl of the folder as records
        (out / split / SCENES).write_text(json.dumps(scene_facts[split], indent=0, sort_keys=True) + "\n")
    meta = {
        # What determines the contents (not where they went or how fast): same arguments, same bytes.
        "arguments": {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONTENT},
        "tasks": {"train": train_tasks, "heldout_scenes": train_tasks, "heldout_tasks": heldout},
        "question_types": list(QUESTION_TYPES),
        "answers": {s: {t: dict(sorted(c.items())) for t, c in sorted(counts[s].items())} for s in SPLITS},
    }
    (out / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def summary_table(meta: dict) -> str:
    lines = ["| question type | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    for qtype in meta["question_types"]:
        cells = [str(sum(meta["answers"][s].get(qtype, {}).values())) for s in SPLITS]
        lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lerobot-ki-make-vlm-corpus",
        description=__doc__.split("\n\n")[0] + " Writes train / heldout_scenes / heldout_tasks folders "
        "that --policy.vlm_dataset and lerobot-ki-eval-vlm read.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output_dir", required=True, help="where the three split folders go")
    p.add_argument("--tasks", default="", help="comma list of training tasks (default: all named tasks)")
    p.add_argument("--heldout_tasks", type=int, default=8, help="tasks held out of training entirely")
    p.add_argument("--train_episodes", type=int, default=20, help="expert episodes (seeds) per task")
    p.add_argument("--heldout_episodes", type=int, default=6, help="held-out episodes per task")
    p.add_argument("--frames_per_episode", type=int, default=3, help="scenes rendered per training episode")
    p.add_argument("--heldout_frames_per_episode", type=int, default=2, help="scenes per held-out episode")
    p.add_argument("--max_step", type=int, default=250, help="scenes are taken at random steps below this")
    p.add_argument("--resolution", type=int, default=96, help="image side, the policy's image_resolution")
    p.add_argument(
        "--loc_format",
        choices=("words", "paligemma"),
        default="words",
        help="location answers as a 3x3 grid in words (byte tokenizer) or PaliGemma <loc> tokens",
    )
    p.add_argument("--train_seed_start", type=int, default=2000, help="first training episode seed")
    p.add_argument("--heldout_seed_start", type=int, default=5000, help="first held-out episode seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out task draw")
    p.add_argument(
        "--workers", type=int, default=2, help="rendering processes (output does not depend on it)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --output_dir")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        meta = make_corpus(args)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(meta))
    print(f"held-out tasks: {', '.join(meta['tasks']['heldout_tasks'])}")
    print(f"corpus written to {args.output_dir} ({META}, " + ", ".join(f"{s}/" for s in SPLITS) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
