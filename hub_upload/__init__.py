"""Publishing tools: verify and push `save_pretrained` directories to the Hub (`qwen_vl.hub_upload.push`), and build
the stage-1 initial checkpoint from OpenCLIP + Qwen-7B (`qwen_vl.hub_upload.convert_openclip`, imported on its own
because it needs torch and open_clip)."""

from .push import push_to_hub, verify_repo_dir

__all__ = ["push_to_hub", "verify_repo_dir"]
