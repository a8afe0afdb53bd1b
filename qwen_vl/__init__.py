"""`qwen_vl`: the project's tools under one import namespace.

    qwen_vl.recipes      the three training stages and `qwen-vl eval`     (folder `recipes/`)
    qwen_vl.hub_upload   conversion and publishing to the Hub             (folder `hub_upload/`)
    qwen_vl.serving      `qwen-vl serve` and `qwen-vl web`                (folder `serving/`)
    qwen_vl.demo         `qwen-vl demo`, the offline shapes-world run     (folder `demo/`)
    qwen_vl.cli          the `qwen-vl` console script

The model itself is the separate package `modeling_qwen_vl`, the remote code that goes into Hub repos.

The subpackages' folders sit at the top of the repository; the wheel maps them here with setuptools' `package-dir`.
Run from a checkout (`PYTHONPATH=<repo>`, without installing), the same names resolve because this package's search
path then also holds the repository root.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "modeling_qwen_vl").is_dir():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (the package's module search path)
