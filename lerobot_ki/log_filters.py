"""Log hygiene installed when the plugin is imported.

LeRobot's `get_safe_default_video_backend` (logger `lerobot.utils.import_utils`) warns with the whole
error when torchcodec is installed but cannot load its FFmpeg libraries: about 70 lines (every FFmpeg
version tried, each with its traceback) in every training, fitting and evaluation log, although LeRobot then
simply decodes with PyAV. The filter keeps that warning, shortened to one line.
"""

from __future__ import annotations

import logging

IMPORT_UTILS_LOGGER = "lerobot.utils.import_utils"


class ShortTorchcodecWarning(logging.Filter):
    """Rewrites LeRobot's multi-line "torchcodec cannot be loaded" warning as one line; passes the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        if "torchcodec" in message and "\n" in message:
            record.msg = (
                "torchcodec is installed but cannot be loaded (no FFmpeg 4-8 shared libraries, or a torch "
                "version it does not support; `python -c 'import torchcodec'` shows why): LeRobot decodes "
                "videos with PyAV instead."
            )
            record.args = ()
        return True


def shorten_torchcodec_warning() -> None:
    """Installs `ShortTorchcodecWarning` on LeRobot's import-utils logger once (idempotent)."""
    logger = logging.getLogger(IMPORT_UTILS_LOGGER)
    if not any(isinstance(f, ShortTorchcodecWarning) for f in logger.filters):
        logger.addFilter(ShortTorchcodecWarning())
