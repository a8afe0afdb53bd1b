"""Publish a `save_pretrained` directory to the Hugging Face Hub, after checking that it is complete and safe to share.

`verify_repo_dir` refuses directories that would give a broken or dangerous repository (missing remote-code files,
inconsistent shards, pickled weights, files that look like credentials); `push_to_hub` uploads exactly the verified
files in one commit (`huggingface_hub.HfApi.create_commit`). The access token is never printed or logged, and is
scrubbed from any error raised by `huggingface_hub`.
"""

import argparse
import fnmatch
import json
import os
import re
from pathlib import Path, PurePosixPath

from transformers.dynamic_module_utils import get_relative_imports

from .shards import SHARD_INDEX, read_shard_index

# Directories never uploaded (skipped silently): VCS data, local caches, Python bytecode.
SKIPPED_DIRS = frozenset({".git", ".cache", "__pycache__"})
# Basenames (lower-cased, fnmatch) that look like credentials: always refused.
SECRET_PATTERNS = (
    ".env*",
    "*.env",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.gpg",
    "*.asc",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    "_netrc",
    ".pypirc",
    ".npmrc",
    ".git-credentials",
    ".dockercfg",
    ".htpasswd",
    "*.token",
)
# Words of a basename (split at `.`, `_`, `-`; lower-cased) that mark a credential file: `hf_token`, `secrets.json`,
# `aws-credentials`, `api_key.txt`, ... (`tokenizer.json` and `special_tokens_map.json` hold none of them).
SECRET_WORDS = frozenset({
    "token", "secret", "secrets", "credential", "credentials", "password", "passwords", "passwd", "apikey", "key",
    "keys", "auth", "oauth", "htpasswd", "shadow", "netrc", "pypirc", "kubeconfig",
})
# Directories whose files are credentials (at any depth).
SECRET_DIRS = frozenset({".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", ".config"})
# Access tokens and private keys, looked for in the content of every file (bytes; the match is never printed).
TOKEN_PATTERNS = re.compile(
    rb"hf_[A-Za-z0-9]{30,}|api_org_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"
    rb"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----|\bAKIA[0-9A-Z]{16}\b|xox[abpr]-[A-Za-z0-9-]{20,}"
)
# Content scanning reads files in chunks of this size, overlapping by the longest token prefix worth matching.
_SCAN_CHUNK, _SCAN_OVERLAP = 1 << 20, 256
# Weight formats that unpickle (and so can run code) when loaded: refused unless `allow_pickle=True`.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files whose `auto_map` names remote-code modules that must ship with the repository.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def _list_files(root: Path, problems: list[str] | None = None) -> list[str]:
    """
    Every regular file under `root` as a POSIX path relative to it, sorted, skipping `SKIPPED_DIRS` at any depth.
    Symbolic links are followed only when they stay inside `root`; links leaving it, links to directories and
    special files (FIFOs, devices, sockets: reading them could block or leak) are reported in `problems` instead.
    """
    files = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in [*filenames, *(d for d in dirnames if Path(dirpath, d).is_symlink())]:
            path = Path(dirpath, name)
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_root):
                    if problems is not None:
                        problems.append(
                            f"{relative} is a symbolic link to {target}, outside the directory: it is not uploaded; "
                            "replace it with a copy of the file if you mean to publish it."
                        )
                    continue
                if target.is_dir():
                    if problems is not None:
                        problems.append(f"{relative} is a symbolic link to a directory: copy the files instead.")
                    continue
            if not path.is_file():  # FIFOs, devices, sockets, dangling links
                if problems is not None:
                    problems.append(f"{relative} is not a regular file (FIFO, device, socket or dangling link).")
                continue
            files.append(relative)
    return sorted(files)


def _secret_reason(relative: str) -> str | None:
    """Why the file at POSIX path `relative` looks like a credential, by its name or directory, or None."""
    parts = relative.lower().split("/")
    name = parts[-1]
    if secret_dirs := SECRET_DIRS.intersection(parts[:-1]):
        return f"inside {sorted(secret_dirs)[0]}/"
    if pattern := next((p for p in SECRET_PATTERNS if fnmatch.fnmatch(name, p)), None):
        return f"name matches {pattern!r}"
    if words := SECRET_WORDS.intersection(re.split(r"[._\-]+", name)):
        return f"name holds {sorted(words)[0]!r}"
    return None


def _find_tokens(path: Path) -> str | None:
    """The kind of access token or private key found in the file's content (never the token itself), or None."""
    with open(path, "rb") as handle:
        tail = b""
        while chunk := handle.read(_SCAN_CHUNK):
            if match := TOKEN_PATTERNS.search(tail + chunk):
                found = match.group()
                return "a PEM private key" if found.startswith(b"-----") else f"a token starting {found[:3].decode()!r}"
            tail = chunk[-_SCAN_OVERLAP:]
    return None


def _module_path(root: Path, module: str) -> Path | None:
    """The file of a dotted module name inside `root`, or None for names that are not identifiers (`..tmp.x`, `a/b`)
    or that would resolve outside it."""
    parts = module.split(".")
    if not parts or not all(part.isidentifier() for part in parts):
        return None
    path = root.joinpath(*parts[:-1], parts[-1] + ".py")
    return path if path.resolve().is_relative_to(root.resolve()) else None


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path.name} is not valid JSON ({error}).")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} must hold a JSON object.")
        return None
    return data


def _auto_map_modules(auto_map: dict) -> list[tuple[str, str]]:
    """(auto class, "module.Class") pairs of an `auto_map`; entries in another repository ("repo--module.Class") and
    empty tokenizer slots are left out."""
    pairs = []
    for auto_class, references in auto_map.items():
        for reference in references if isinstance(references, (list, tuple)) else [references]:
            if isinstance(reference, str) and "--" not in reference:
                pairs.append((auto_class, reference))
    return pairs


def _check_remote_code(root: Path, problems: list[str]) -> None:
    """Every module named in an `auto_map`, and every module those import relatively, must be in the directory."""
    needed: dict[str, str] = {}  # module file -> why it is needed
    for config_name in AUTO_MAP_FILES:
        if not (root / config_name).is_file():
            continue
        data = _read_json(root / config_name, problems)
        auto_map = (data or {}).get("auto_map") or {}
        if not isinstance(auto_map, dict):
            problems.append(f"{config_name}: auto_map must be an object mapping Auto classes to 'module.Class'.")
            continue
        for auto_class, reference in _auto_map_modules(auto_map):
            module = reference.rsplit(".", 1)[0] if "." in reference else ""
            if _module_path(root, module) is None:
                problems.append(
                    f"{config_name} auto_map[{auto_class!r}] = {reference!r} is not a 'module.Class' reference to a "
                    "file in this directory (names must be Python identifiers): fix the entry."
                )
                continue
            module_file = module.replace(".", "/") + ".py"
            needed.setdefault(module_file, f"{config_name} auto_map[{auto_class!r}] = {reference!r}")

    pending = list(needed)
    while pending:
        module_file = pending.pop()
        path = root / module_file
        if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
            continue  # reported by `_list_files`; never read
        if not path.is_file():
            problems.append(
                f"{module_file} is missing but {needed[module_file]} needs it: copy the file into the directory or "
                "remove that auto_map entry."
            )
            continue
        try:
            relative_imports = sorted(get_relative_imports(path))  # what transformers will load with this module
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{module_file} cannot be read as UTF-8 Python source ({error}).")
            continue
        for name in relative_imports:
            parent = PurePosixPath(module_file).parent
            module = ".".join([*(parent.parts if parent.parts != (".",) else ()), name])
            if _module_path(root, module) is None:
                problems.append(f"{module_file} imports .{name}, which is not a module of this directory.")
                continue
            imported = module.replace(".", "/") + ".py"
            if imported not in needed:
                needed[imported] = f"{module_file} imports it"
                pending.append(imported)


def _check_safetensors_file(path: Path, name: str, problems: list[str]) -> None:
    """Open the header with `safetensors.safe_open`, which checks it as loading will (a JSON header whose tensors
    cover the file exactly): catches truncated downloads and Git LFS pointer files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as error:
        if "not fully covered" in str(error):
            problems.append(f"{name} is truncated ({path.stat().st_size} bytes; {error}): re-save it.")
        else:
            problems.append(f"{name} is not a valid safetensors file ({error}): re-save it with save_pretrained.")


def _check_weights(root: Path, files: list[str], allow_pickle: bool, problems: list[str]) -> None:
    top_level = [f for f in files if "/" not in f]
    safetensors_files = {f for f in top_level if f.endswith(".safetensors")}
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        problems.append(
            f"pickle files can run code when loaded and are refused: {', '.join(pickles)}. Save the weights as "
            "safetensors (save_pretrained(..., safe_serialization=True)) and delete these files, or pass "
            "allow_pickle=True (--allow-pickle) if you really mean to publish them."
        )
    if not safetensors_files and not (pickles and allow_pickle):
        problems.append("no model weights found: expected model.safetensors, or shards with " + SHARD_INDEX + ".")
    for name in sorted(safetensors_files):
        _check_safetensors_file(root / name, name, problems)

    if SHARD_INDEX in top_level:
        try:
            named = set(read_shard_index(root / SHARD_INDEX))
        except ValueError as error:
            problems.append(str(error))
            return
        if missing := sorted(named - safetensors_files):
            problems.append(f"{SHARD_INDEX} names shards that are not in the directory: {', '.join(missing)}.")
        if unnamed := sorted(safetensors_files - named):
            problems.append(
                f"safetensors files not named in {SHARD_INDEX}: {', '.join(unnamed)} (stale shards from an earlier "
                "save? delete them or re-save into an empty directory)."
            )
    elif shards := sorted(f for f in safetensors_files if _SHARD_NAME.search(f)):
        problems.append(f"sharded weights ({', '.join(shards)}) without {SHARD_INDEX}: re-save with save_pretrained.")


def verify_repo_dir(path: str | os.PathLike, *, allow_pickle: bool = False) -> list[str]:
    """
    Check that `path` (a `save_pretrained` directory) is complete and safe to publish; return the files to upload.

    Checks: `config.json` exists; every module named in an `auto_map` (config, tokenizer, preprocessor, processor
    configs) is present, with the modules it imports relatively; the shard index and the safetensors files agree and
    every safetensors header is readable; no pickled weights (`*.bin`, `*.pt`, `*.pkl`, ...) unless `allow_pickle`;
    no files that look like credentials by name (`SECRET_PATTERNS`: `.env*`, `*.pem`, `id_rsa*`, `.netrc`,
    `.pypirc`, ...; names holding a `SECRET_WORDS` word: `hf_token`, `secrets.json`, ...; files under `.ssh/`,
    `.aws/`, ...) or by content (`TOKEN_PATTERNS`: Hugging Face, GitHub, AWS, Slack tokens, PEM private keys; every
    file is scanned); nothing outside `path`: symbolic links leaving it, links to directories and special files are
    refused, and `auto_map`/relative-import module names must be identifiers naming files inside it. `.git/`,
    `.cache/` and `__pycache__/` are skipped silently.

    Returns the sorted POSIX paths (relative to `path`) to upload. Raises `ValueError` listing every problem found.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory: pass the directory written by save_pretrained.")
    problems: list[str] = []
    files = _list_files(root, problems)

    secrets = {f: reason for f in files if (reason := _secret_reason(f))}
    if secrets:
        problems.append(
            "files that look like credentials must never be published: "
            + ", ".join(f"{f} ({reason})" for f, reason in secrets.items())
            + ". Move them out of the directory."
        )
    tokens = {f: kind for f in files if f not in secrets and (kind := _find_tokens(root / f))}
    if tokens:
        problems.append(
            "files holding what looks like an access token or private key: "
            + ", ".join(f"{f} ({kind})" for f, kind in tokens.items())
            + ". Remove the secret from them (and revoke it if it was ever shared)."
        )
    if "config.json" not in files:
        problems.append("config.json is missing: save the model with save_pretrained into this directory.")
    _check_remote_code(root, problems)
    _check_weights(root, files, allow_pickle, problems)

    if problems:
        raise ValueError(f"refusing to upload {root}:\n" + "\n".join(f"  - {p}" for p in problems))
    return files


def _human_size(num_bytes: float) -> str:
    for unit in ("B", "kB", "MB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def _scrub(error: BaseException, secret: str) -> None:
    """Replace `secret` in the messages of `error` and of every exception chained to it (in place)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(a.replace(secret, "***") if isinstance(a, str) else a for a in current.args)
        if isinstance(getattr(current, "server_message", None), str):
            current.server_message = current.server_message.replace(secret, "***")
        if hasattr(current, "__notes__"):
            current.__notes__ = [note.replace(secret, "***") for note in current.__notes__]
        pending += [current.__cause__, current.__context__]


def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_repo: bool = True,
    dry_run: bool = False,
    allow_pickle: bool = False,
) -> str | list[str]:
    """
    Verify `path` with [`verify_repo_dir`] and upload its files to the model repository `repo_id` in one commit.

    Creates the repository (`private` applies only when it is new) unless `create_repo=False`, and the branch
    `revision` when it is not `main`. The token is `token`, else huggingface_hub's usual resolution (`HF_TOKEN`, then
    the stored login); it is never printed or logged and is removed from the messages of any error raised here.

    Returns the commit URL; with `dry_run=True`, prints the files and total size that would be sent and returns the
    file list without contacting the Hub.
    """
    files = verify_repo_dir(path, allow_pickle=allow_pickle)
    root = Path(path)
    if dry_run:
        sizes = {name: (root / name).stat().st_size for name in files}
        total = sum(sizes.values())
        print(
            f"Dry run: would upload {len(files)} files, {_human_size(total)} ({total:,} bytes), to {repo_id} "
            f"(revision {revision or 'main'}):"
        )
        width = max(map(len, files))
        for name in files:
            print(f"  {name:<{width}}  {_human_size(sizes[name]):>9}")
        return files

    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `hf auth login`.")
    api = HfApi(token=token, library_name="qwen-vl-hf")
    try:
        if create_repo:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=root / name) for name in files]
        commit = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            revision=revision,
            commit_message=commit_message or "Upload Qwen-VL checkpoint",
        )
    except Exception as error:
        _scrub(error, token)
        raise
    return commit.commit_url


def main(argv: list[str] | None = None) -> int:
    """`qwen-vl push DIR REPO_ID [--private] [--revision BR] [--message M] [--dry-run] [--allow-pickle]`."""
    parser = argparse.ArgumentParser(
        prog="qwen-vl push",
        description="Verify a save_pretrained directory and upload it to the Hugging Face Hub. The token comes from "
        "HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("dir", help="directory written by save_pretrained")
    parser.add_argument("repo_id", help="target model repository, e.g. user/qwen-vl-stage1")
    parser.add_argument("--private", action="store_true", help="create the repository as private (new repos only)")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="verify and list what would be sent; contact nothing")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickled weight files (*.bin, *.pt, ...)")
    parser.add_argument("--no-create", action="store_true", help="fail if the repository does not exist")
    args = parser.parse_args(argv)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        result = push_to_hub(
            args.dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.message,
            create_repo=not args.no_create,
            dry_run=args.dry_run,
            allow_pickle=args.allow_pickle,
        )
    except (ValueError, HfHubHTTPError) as error:  # token already scrubbed from Hub errors
        parser.exit(1, f"qwen-vl push: error: {error}\n")
    if not args.dry_run:
        print(f"Uploaded to {result}")
    return 0
