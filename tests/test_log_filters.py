"""LeRobot's ~100-line "torchcodec cannot be loaded" warning is one line once the plugin is imported."""

from __future__ import annotations

import logging

import lerobot_ki  # noqa: F401  (installs the filter)
from lerobot_ki.log_filters import IMPORT_UTILS_LOGGER, ShortTorchcodecWarning, shorten_torchcodec_warning


def test_torchcodec_warning_is_one_line_and_other_messages_pass(caplog):
    logger = logging.getLogger(IMPORT_UTILS_LOGGER)
    shorten_torchcodec_warning()  # idempotent
    assert sum(isinstance(f, ShortTorchcodecWarning) for f in logger.filters) == 1
    long_error = "Could not load libtorchcodec. Likely causes:\n" + "  traceback line\n" * 90
    with caplog.at_level(logging.INFO, logger=IMPORT_UTILS_LOGGER):
        logger.warning(
            f"{long_error}\n'torchcodec' is installed but cannot be loaded (see the error above). "
            "Falling back to 'pyav' as a default decoder."
        )
        logger.warning("'torchcodec' is not available in your platform, falling back to 'pyav'")
        logger.info("Imported third-party plugin: %s", "x")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "\n" not in messages[0] and "PyAV" in messages[0]
    assert messages[1:] == [
        "'torchcodec' is not available in your platform, falling back to 'pyav'",
        "Imported third-party plugin: x",
    ]
