"""Text sources shared by calibration and evaluation (pinned by hash)."""
