"""The code version recorded in every manifest and model card."""

import subprocess
from importlib import metadata
from pathlib import Path


def _code_version() -> str:
    try:
        version = metadata.version("distillery")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


CODE_VERSION = _code_version()
