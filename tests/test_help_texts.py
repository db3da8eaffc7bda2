"""`lerobot-train --policy.type=ki_vla --help` shows KIConfig's field comments (draccus reads the comment
above or beside each field): they must read as help, not as code-layout banners."""

from __future__ import annotations

import dataclasses

from draccus.wrappers import docstring

from lerobot_ki.configuration_ki import KIConfig


def test_no_field_help_carries_a_banner():
    helps = {
        f.name: docstring.get_preferred_help_text(
            docstring.get_attribute_docstring(KIConfig, f.name), preferred_help="inline"
        )
        for f in dataclasses.fields(KIConfig)
    }
    assert helps["paligemma_variant"].strip().startswith("`gemma_2b` is the real PaliGemma 3B")
    assert helps["num_inference_steps"] == "Euler steps of the expert at inference"
    assert not [name for name, text in helps.items() if "---" in (text or "")]
