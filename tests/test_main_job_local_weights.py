"""The main job's training stage with `--preset real` and the user's local files, as the main job's docstring
shows it offline: `--policy.pretrained_path=<a pi05 checkpoint dir>` and `--policy.text_tokenizer=<a Gemma
tokenizer dir>`, shrunk to the tiny sizes by pass-through flags so that it runs on a CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from conftest import REPO_ID
from safetensors.torch import load_file
from tiny_setup import tiny_config, write_pi05_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from lerobot_ki.cli.fit_fast import fit_from_args
from lerobot_ki.cli.fit_fast import parse_args as fit_fast_args
from lerobot_ki.modeling_ki import KIPolicy

ROOT = Path(__file__).resolve().parents[1]
MARKER = "only-in-the-local-tokenizer"
# Pass-through flags that replace the real preset's sizes (gemma_2b, gemma_300m, 224 px) with tiny ones.
SHRINK = [
    "--policy.paligemma_variant=tiny",
    "--policy.action_expert_variant=tiny",
    "--policy.image_resolution=[32,32]",
    "--policy.tokenizer_max_length=96",
]


def _load_main_job():
    spec = importlib.util.spec_from_file_location("main_job_local", ROOT / "examples/metaworld/main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gemma_ordered_tokenizer(folder: Path) -> Path:
    """A tokenizer.json with Gemma's special ids (<pad>=0 <eos>=1 <bos>=2, <bos> prepended), as a local
    copy of PaliGemma's tokenizer has them, but a few words instead of 257k pieces."""
    words = ["<pad>", "<eos>", "<bos>", "<unk>", MARKER, "push", "lift", "open", "the", "red", "blue"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.add_special_tokens(words[:4])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_real_preset_trains_from_local_pi05_weights_and_tokenizer(
    dataset_root, offline_env, tmp_path, monkeypatch
):
    main_job = _load_main_job()
    tokenizer = _gemma_ordered_tokenizer(tmp_path / "paligemma_tokenizer")
    # A tokenizer other than `byte` means the PaliGemma vocabulary (257,152 rows), so the tiny pi05
    # checkpoint is written with it, as lerobot/pi05_base has it.
    cfg = tiny_config(image_resolution=(32, 32), fast_vocab_size=1024, text_tokenizer=str(tokenizer))
    torch.manual_seed(0)
    source = KIPolicy(cfg)
    weights = write_pi05_checkpoint(tmp_path / "pi05_base", source, cfg)
    args = main_job.parse_args(
        ["--preset", "real", "--steps", "2", "--batch-size", "2", "--chunk-size", "10", "--n-action-steps",
         "5", "--num-workers", "0", "--fast-vocab-size", "1024", f"--policy.pretrained_path={weights}",
         f"--policy.text_tokenizer={tokenizer}", *SHRINK]
    )  # fmt: skip
    fast_dir, train_dir, log = tmp_path / "fast_tokenizer", tmp_path / "train", tmp_path / "train.log"
    # The job's FAST stage (lerobot-ki-fit-fast with its flags), in-process: it is not what is tested here.
    fit_from_args(
        fit_fast_args([f"--dataset.repo_id={REPO_ID}", f"--dataset.root={dataset_root}",
                       f"--chunk_size={args.chunk_size}", f"--vocab_size={args.fast_vocab_size}",
                       "--normalization=MIN_MAX",
                       f"--output_dir={fast_dir}"])
    )  # fmt: skip
    for key in ("HF_HUB_OFFLINE", "HF_HOME", "HF_LEROBOT_HOME", "WANDB_MODE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(key, offline_env[key])  # main_job.run hands os.environ to the stage

    main_job.run(main_job.train_command(args, REPO_ID, dataset_root, fast_dir, train_dir, log_freq=1), log)

    text = log.read_text()
    assert f"Weights from {weights}: " in text
    saved = train_dir / "checkpoints" / "last" / "pretrained_model"
    config = json.loads((saved / "config.json").read_text())
    assert config["text_tokenizer"] == str(tokenizer) and config["fast_vocab_size"] == 1024
    # The preset's flags that no pass-through flag replaced reached the policy; the replaced ones did not.
    assert config["dtype"] == "bfloat16" and config["gradient_checkpointing"] is True
    assert (config["paligemma_variant"], config["action_expert_variant"]) == ("tiny", "tiny")
    # The saved preprocessor tokenizes with the local tokenizer itself, not a Hub copy of PaliGemma's.
    steps = json.loads((saved / "policy_preprocessor.json").read_text())["steps"]
    (step,) = [s for s in steps if s["registry_name"] == "ki_vla_text_tokenizer"]
    assert step["config"]["tokenizer_name"] == str(tokenizer)
    blob = load_file(saved / step["state_file"])["tokenizer_json"]
    assert MARKER in bytes(blob.numpy()).decode("utf-8")
    # The pi05 weights are the starting point: two optimizer steps move a weight by ~2 lr.
    trained = load_file(saved / "model.safetensors")
    key = "model.time_mlp_in.weight"  # `action_time_mlp_in` in the pi05 file
    assert torch.allclose(trained[key].float(), source.state_dict()[key], atol=5e-3)
