"""The README's "Python" section, run as written (paths swapped for a tiny checkpoint and dataset), in a fresh
interpreter: there nothing has imported the plugin yet, as in a user's script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tiny_setup import build

ROOT = Path(__file__).resolve().parents[1]


def _readme_snippet() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_readme_python_snippet_runs_offline(tmp_path, dataset_root, offline_env):
    policy, pre, post, _ = build(dataset_root)
    ckpt = tmp_path / "pretrained_model"
    policy.save_pretrained(ckpt)
    pre.save_pretrained(ckpt)
    post.save_pretrained(ckpt)

    code = (
        _readme_snippet()
        .replace("outputs/ki_tiny/checkpoints/last/pretrained_model", str(ckpt))
        .replace('"local/my_data"', '"local/ki_synthetic"')
        .replace("/data/my_data", str(dataset_root))
    )
    assert str(ckpt) in code and str(dataset_root) in code, "the README snippet's placeholders changed"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 3])" in proc.stdout, proc.stdout


def test_import_registers_without_loading_the_model_code(offline_env):
    code = (
        "import sys, lerobot_ki\n"
        "from lerobot.policies.factory import make_policy_config\n"
        "cfg = make_policy_config('ki_vla', paligemma_variant='tiny', action_expert_variant='tiny')\n"
        "assert type(cfg) is lerobot_ki.KIConfig\n"
        "assert 'lerobot_ki.modeling_ki' not in sys.modules\n"
        "from lerobot_ki import KIPolicy\n"
        "from lerobot_ki.modeling_ki import KIPolicy as direct\n"
        "assert KIPolicy is direct\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
