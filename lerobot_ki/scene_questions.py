"""Questions about a Meta-World scene whose answers are read from the simulator state.

A `SceneFacts` holds what the simulator knows about one rendered frame (where the gripper and the task's
object are, in the world and in the image, how open the gripper is); `questions_for` turns it into
(prompt, answer) pairs of fixed question types. Nothing here renders or imports the simulator, so the
question logic is tested on hand-made facts.

Answers are short words so that the byte tokenizer of the `tiny` preset spells them in a few tokens;
locations are a cell of an 8 x 8 grid ("row 5, column 6"); with `loc_format="paligemma"` the two
location questions answer in PaliGemma's `<locYYYY><locXXXX>`
tokens instead (1024 bins per image axis, y first, as PaliGemma's detection outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

# Per task: (what is on the table, the part `_get_pos_objects()[:3]` locates). Written from each scene's
# MuJoCo bodies and a rendered frame; tasks whose object we could not name with confidence are left out.
TASK_OBJECTS: dict[str, tuple[str, str]] = {
    "assembly-v3": ("a nut and a peg", "nut"),
    "basketball-v3": ("a ball and a hoop", "ball"),
    "bin-picking-v3": ("a puck and two bins", "puck"),
    "box-close-v3": ("a box and a lid", "lid"),
    "button-press-topdown-v3": ("a button box", "button"),
    "button-press-topdown-wall-v3": ("a button box and a wall", "button"),
    "button-press-v3": ("a button box", "button"),
    "button-press-wall-v3": ("a button box and a wall", "button"),
    "coffee-button-v3": ("a coffee machine", "button"),
    "coffee-pull-v3": ("a coffee machine and a mug", "mug"),
    "coffee-push-v3": ("a coffee machine and a mug", "mug"),
    "dial-turn-v3": ("a dial", "dial"),
    "disassemble-v3": ("a nut and a peg", "nut"),
    "door-close-v3": ("a door", "handle"),
    "door-lock-v3": ("a door with a lock", "lock"),
    "door-open-v3": ("a door", "handle"),
    "door-unlock-v3": ("a door with a lock", "lock"),
    "drawer-close-v3": ("a drawer", "handle"),
    "drawer-open-v3": ("a drawer", "handle"),
    "faucet-open-v3": ("a faucet", "handle"),
    "faucet-close-v3": ("a faucet", "handle"),
    "hammer-v3": ("a hammer and a nail box", "hammer"),
    "handle-press-side-v3": ("a handle box", "handle"),
    "handle-press-v3": ("a handle box", "handle"),
    "handle-pull-side-v3": ("a handle box", "handle"),
    "handle-pull-v3": ("a handle box", "handle"),
    "lever-pull-v3": ("a lever", "lever"),
    "peg-insert-side-v3": ("a peg and a box", "peg"),
    "pick-place-wall-v3": ("a puck and a wall", "puck"),
    "pick-out-of-hole-v3": ("a puck and a hole", "puck"),
    "reach-v3": ("a puck", "puck"),
    "push-back-v3": ("a puck", "puck"),
    "push-v3": ("a puck", "puck"),
    "pick-place-v3": ("a puck", "puck"),
    "plate-slide-v3": ("a plate and a net", "plate"),
    "plate-slide-side-v3": ("a plate and a net", "plate"),
    "plate-slide-back-v3": ("a plate and a net", "plate"),
    "plate-slide-back-side-v3": ("a plate and a net", "plate"),
    "peg-unplug-side-v3": ("a plug and a socket", "plug"),
    "soccer-v3": ("a ball and a goal", "ball"),
    "stick-push-v3": ("a stick and a bottle", "stick"),
    "stick-pull-v3": ("a stick and a bottle", "stick"),
    "push-wall-v3": ("a puck and a wall", "puck"),
    "reach-wall-v3": ("a puck and a wall", "puck"),
    "shelf-place-v3": ("a block and a shelf", "block"),
    "sweep-into-v3": ("a puck and a hole", "puck"),
    "sweep-v3": ("a puck", "puck"),
    "window-open-v3": ("a window", "handle"),
    "window-close-v3": ("a window", "handle"),
}

QUESTION_TYPES = (
    "objects",
    "gripper_location",
    "object_location",
    "left_right",
    "above_below",
    "gripper_state",
    "distance",
)
# Location in words: the cell of an 8 x 8 grid over the image. The workspace fills only the middle of
# LeRobot's Meta-World view (90% of gripper positions lie in x 0.44-0.77, y 0.39-0.69 of the image), where
# a 3 x 3 grid would answer "middle center" two times in three.
GRID = 8
# Margins under which a relation is ambiguous to a viewer: such questions are not asked.
LEFT_RIGHT_MARGIN = 0.025  # of the image width (2.4 px at 96 px)
ABOVE_BELOW_MARGIN_M = 0.03
GRIPPER_OPEN_ABOVE = 0.8  # Meta-World's normalized finger distance (obs[3]): 1 = fully open
GRIPPER_CLOSED_BELOW = 0.5
TOUCHING_M, NEAR_M = 0.05, 0.15  # gripper-to-object distance bins: touching / near / far


@dataclass(frozen=True)
class SceneFacts:
    """What the simulator says about one frame. Image coordinates are fractions of the width/height of the
    image the policy sees (x to the right, y down), after LeRobot's flip of the corner2 camera."""

    task: str
    hand_xyz: tuple[float, float, float]  # world, metres (the tool centre point between the fingers)
    object_xyz: tuple[float, float, float]
    hand_xy_image: tuple[float, float]
    object_xy_image: tuple[float, float]
    gripper_opening: float  # 0 closed .. 1 open


@dataclass(frozen=True)
class QA:
    type: str
    prompt: str
    answer: str


def grid_cell(xy: tuple[float, float]) -> str:
    """(x, y) in image fractions -> "row R, column C" of the GRID x GRID grid, counted from 1 at the top
    left."""
    col, row = (min(GRID - 1, max(0, int(v * GRID))) + 1 for v in xy)
    return f"row {row}, column {col}"


def loc_tokens(xy: tuple[float, float]) -> str:
    """(x, y) in image fractions -> PaliGemma's `<locYYYY><locXXXX>` (1024 bins, y first)."""
    x, y = (min(1023, max(0, int(v * 1024))) for v in xy)
    return f"<loc{y:04d}><loc{x:04d}>"


def in_image(xy: tuple[float, float]) -> bool:
    return 0.0 <= xy[0] < 1.0 and 0.0 <= xy[1] < 1.0


def questions_for(facts: SceneFacts, loc_format: str = "words") -> list[QA]:
    """Every question type that has an unambiguous answer in this frame (see the margins above)."""
    if loc_format not in ("words", "paligemma"):
        raise ValueError(f"loc_format must be 'words' or 'paligemma', got {loc_format!r}")
    if facts.task not in TASK_OBJECTS:
        raise ValueError(f"No object names for task {facts.task!r}; known: {sorted(TASK_OBJECTS)}")
    scene, noun = TASK_OBJECTS[facts.task]
    where = grid_cell if loc_format == "words" else loc_tokens
    out = [QA("objects", "What is on the table?", scene)]
    if in_image(facts.hand_xy_image):
        out.append(QA("gripper_location", "Where is the gripper?", where(facts.hand_xy_image)))
    if in_image(facts.object_xy_image):
        out.append(QA("object_location", f"Where is the {noun}?", where(facts.object_xy_image)))
    dx = facts.hand_xy_image[0] - facts.object_xy_image[0]
    if abs(dx) >= LEFT_RIGHT_MARGIN:
        out.append(
            QA("left_right", f"Is the gripper left or right of the {noun}?", "left" if dx < 0 else "right")
        )
    dz = facts.hand_xyz[2] - facts.object_xyz[2]
    if abs(dz) >= ABOVE_BELOW_MARGIN_M:
        out.append(
            QA("above_below", f"Is the gripper above or below the {noun}?", "above" if dz > 0 else "below")
        )
    if facts.gripper_opening > GRIPPER_OPEN_ABOVE or facts.gripper_opening < GRIPPER_CLOSED_BELOW:
        state = "open" if facts.gripper_opening > GRIPPER_OPEN_ABOVE else "closed"
        out.append(QA("gripper_state", "Is the gripper open or closed?", state))
    dist = sum((a - b) ** 2 for a, b in zip(facts.hand_xyz, facts.object_xyz, strict=True)) ** 0.5
    bin_ = "touching" if dist < TOUCHING_M else "near" if dist < NEAR_M else "far"
    out.append(QA("distance", f"How far is the gripper from the {noun}?", bin_))
    return out


def normalize_answer(text: str) -> str:
    """Exact-match scoring ignores case, surrounding blanks and a final full stop."""
    return " ".join(text.strip().lower().rstrip(".").split())
